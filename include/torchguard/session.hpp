// A training run's record: TrainingSession, a named run logged from start to end, its metrics in
// JSON lines, its stop request (SIGINT/SIGTERM) as a CancellationToken; TensorBoardWriter, the
// event files TensorBoard reads, on its own or written by the session.
// Includes core.hpp, session/training_session.hpp and session/tensorboard.hpp (the others in
// session/ are theirs: the log file, the metrics rows, the session's board, the signal handlers,
// the TFRecord framing).
#pragma once

#include "torchguard/core.hpp"
#include "torchguard/session/tensorboard.hpp"
#include "torchguard/session/training_session.hpp"
