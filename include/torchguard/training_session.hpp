// TrainingSession: a named training run, logged from start to end, its metrics in JSON lines,
// and its stop request (SIGINT/SIGTERM) as a CancellationToken. See session/.
#pragma once

#include "torchguard/core/exit_status.hpp"
#include "torchguard/session/training_session.hpp"
