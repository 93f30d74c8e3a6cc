// Async loading and inference on futures, what asyncio.gather, Semaphore and a DataLoader give
// Python, without std::async's pitfalls (a thread per call, no bound, lost errors):
//
//   auto images = torchguard::gather(paths, load_image);  // all at once, results in input order
//
//   torchguard::GatherOptions options;
//   options.max_in_flight = 4;                              // a window: at most 4 loads at once
//   options.item_timeout = std::chrono::seconds(2);
//   for (auto& [index, image] : torchguard::gather(paths, load_image, options)) { ... }
//
//   torchguard::Prefetcher<Batch> batches(count, [&](std::size_t i) { return load_batch(i); });
//   while (auto batch = batches.next()) train_step(*batch);   // 4 loads stay ahead
//
//   torchguard::BatchedInference server(model, 32, std::chrono::milliseconds(2));
//   std::future<torch::Tensor> logits = server.submit(image);  // from any thread
//
//   options.cancellation = source.token();  // gather, Prefetcher and BatchedInference stop with it
//
// gather and Prefetcher run a fixed set of worker threads (max_in_flight of them, launched with
// std::async) that take items in order, so 10,000 items cost 4 threads, not 10,000. No thread
// outlives a gather or a Prefetcher. Cancellation and timeouts are cooperative: a task polls its
// CancellationToken; a task that ignores it is waited for (C++ cannot stop a thread safely), and
// its result is dropped.
//
// Includes core.hpp and async/{batched_inference,gather,gather_futures,prefetcher,task_pool}.hpp
// (task_pool.hpp: the worker threads behind gather and Prefetcher, with TaskError, Order and
// Indexed; cuda_stage.hpp: the Prefetcher's copy to a GPU).
#pragma once

#include "torchguard/async/batched_inference.hpp"
#include "torchguard/async/gather.hpp"
#include "torchguard/async/gather_futures.hpp"
#include "torchguard/async/prefetcher.hpp"
#include "torchguard/async/task_pool.hpp"
#include "torchguard/core.hpp"
