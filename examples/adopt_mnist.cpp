// adopt_mnist: pytorch/examples' cpp/mnist/mnist.cpp adopted to torchguard, with as few changes as
// possible (each is marked "torchguard:"). What the changes give:
//   TrainingSession    the run's log (console and <run-dir>/train.log); SIGINT/SIGTERM ask for a
//                      stop instead of killing the run
//   CheckpointGuard    restores the newest checkpoint at start; saves every --checkpoint-every
//                      steps, at once on a stop, and at the end
//   ResumableSampler   the training order, a function of the seed and the epoch, and the place in
//                      the epoch, saved in the checkpoint
// Interrupted (Ctrl-C; or kill -9, from the last checkpoint), the same command goes on at the
// next batch of the epoch it was in and ends with the same parameters, bit for bit, as a run that
// was never interrupted (on the CPU, with the same --threads). docs/adopting.md walks through the
// changes.
//
//   adopt_mnist --data-dir data --run-dir mnist-run     (MNIST's uncompressed idx files in data/)
#include <torch/torch.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>                // torchguard: the settings from the command line
#include <torchguard/torchguard.hpp>  // torchguard

#include "parameter_fingerprint.hpp"  // torchguard: to compare runs

// The batch size for training.
const int64_t kTrainBatchSize = 64;

// The batch size for testing.
const int64_t kTestBatchSize = 1000;

// After how many batches to log a new update with the loss value.
const int64_t kLogInterval = 10;

// torchguard: what was constant is a command-line option.
struct Settings {
  std::string data_root = "./data";  // where to find the MNIST dataset
  int64_t epochs = 10;               // the number of epochs to train
  std::string run_dir = "mnist-run";
  std::string checkpoint_dir;  // default: <run_dir>/checkpoints
  int64_t checkpoint_every = 100;
  int64_t max_steps = 0;  // 0: no limit
  int threads = 0;        // 0: LibTorch's default
};

struct Net : torch::nn::Module {
  Net()
      : conv1(torch::nn::Conv2dOptions(1, 10, /*kernel_size=*/5)),
        conv2(torch::nn::Conv2dOptions(10, 20, /*kernel_size=*/5)),
        fc1(320, 50),
        fc2(50, 10) {
    register_module("conv1", conv1);
    register_module("conv2", conv2);
    register_module("conv2_drop", conv2_drop);
    register_module("fc1", fc1);
    register_module("fc2", fc2);
  }

  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(torch::max_pool2d(conv1->forward(x), 2));
    x = torch::relu(torch::max_pool2d(conv2_drop->forward(conv2->forward(x)), 2));
    x = x.view({-1, 320});
    x = torch::relu(fc1->forward(x));
    x = torch::dropout(x, /*p=*/0.5, /*training=*/is_training());
    x = fc2->forward(x);
    return torch::log_softmax(x, /*dim=*/1);
  }

  torch::nn::Conv2d conv1;
  torch::nn::Conv2d conv2;
  torch::nn::Dropout2d conv2_drop;  // torchguard: FeatureDropout is gone from LibTorch 2.x
  torch::nn::Linear fc1;
  torch::nn::Linear fc2;
};

// torchguard: returns false when the run is to stop (a stop request, --max-steps).
template <typename DataLoader>
bool train(size_t epoch, Net& model, torch::Device device, DataLoader& data_loader,
           torch::optim::Optimizer& optimizer, size_t dataset_size,
           torchguard::ResumableSampler& sampler,    // torchguard
           torchguard::CheckpointGuard& checkpoint,  // torchguard
           int64_t max_steps) {                      // torchguard
  model.train();
  // torchguard: a resumed epoch counts on from where it was.
  size_t batch_idx = sampler.position() / kTrainBatchSize;
  // torchguard: resume() goes on where the sampler's state says, and counts the batches the loop
  // receives (the loader fetches ahead).
  for (auto& batch : torchguard::resume(data_loader, sampler)) {
    auto data = batch.data.to(device), targets = batch.target.to(device);
    optimizer.zero_grad();
    auto output = model.forward(data);
    auto loss = torch::nll_loss(output, targets);
    AT_ASSERT(!std::isnan(loss.template item<float>()));
    loss.backward();
    optimizer.step();

    if (batch_idx++ % kLogInterval == 0) {
      std::printf("\rTrain Epoch: %zu [%5zu/%5zu] Loss: %.4f", epoch,
                  batch_idx * static_cast<size_t>(batch.data.size(0)), dataset_size,
                  loss.template item<float>());
    }
    // torchguard: the step is done: a checkpoint every N steps, and at once on a stop request.
    if (checkpoint.step({{"loss", loss.template item<float>()}}).stop) return false;
    if (max_steps > 0 && checkpoint.current_step() >= max_steps) return false;
  }
  return true;
}

template <typename DataLoader>
void test(Net& model, torch::Device device, DataLoader& data_loader, size_t dataset_size) {
  torch::NoGradGuard no_grad;
  model.eval();
  double test_loss = 0;
  int32_t correct = 0;
  for (const auto& batch : data_loader) {
    auto data = batch.data.to(device), targets = batch.target.to(device);
    auto output = model.forward(data);
    test_loss += torch::nll_loss(output, targets,
                                 /*weight=*/{}, torch::Reduction::Sum)
                     .template item<float>();
    auto pred = output.argmax(1);
    correct += pred.eq(targets).sum().template item<int64_t>();
  }

  test_loss /= dataset_size;
  std::printf("\nTest set: Average loss: %.4f | Accuracy: %.3f\n", test_loss,
              static_cast<double>(correct) / dataset_size);
}

auto run(int argc, char** argv) -> int {
  // torchguard: the settings.
  Settings settings;
  CLI::App app{
      "pytorch/examples' MNIST, adopted to torchguard: Ctrl-C saves a checkpoint; the same "
      "command resumes at the next batch."};
  app.add_option("--data-dir", settings.data_root, "MNIST's uncompressed idx files")
      ->capture_default_str();
  app.add_option("--run-dir", settings.run_dir, "the log and the checkpoints")
      ->capture_default_str();
  app.add_option("--checkpoint-dir", settings.checkpoint_dir,
                 "checkpoints (default: <run-dir>/checkpoints)");
  app.add_option("--epochs", settings.epochs)->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--max-steps", settings.max_steps, "stop after this many steps (0: no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--checkpoint-every", settings.checkpoint_every, "steps between checkpoints")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--threads", settings.threads, "intra-op threads (results depend on it)")
      ->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);
  if (settings.checkpoint_dir.empty()) settings.checkpoint_dir = settings.run_dir + "/checkpoints";
  if (settings.threads > 0) torch::set_num_threads(settings.threads);

  torch::manual_seed(1);

  // torchguard: the run's log; SIGINT/SIGTERM ask for a stop. The program runs inside it.
  torchguard::TrainingSessionOptions session_options;
  session_options.log_file = settings.run_dir + "/train.log";
  session_options.handle_signals = true;
  torchguard::TrainingSession session("mnist", session_options);
  return session.run([&] {
    torch::DeviceType device_type;
    if (torch::cuda::is_available()) {
      std::cout << "CUDA available! Training on GPU." << std::endl;
      device_type = torch::kCUDA;
    } else {
      std::cout << "Training on CPU." << std::endl;
      device_type = torch::kCPU;
    }
    torch::Device device(device_type);

    auto model = std::make_shared<Net>();  // torchguard: shared with the CheckpointGuard
    model->to(device);

    auto train_dataset = torch::data::datasets::MNIST(settings.data_root)
                             .map(torch::data::transforms::Normalize<>(0.1307, 0.3081))
                             .map(torch::data::transforms::Stack<>());
    const size_t train_dataset_size = train_dataset.size().value();
    // torchguard: the order is a function of the seed and the epoch; the place in the epoch is
    // in the checkpoint. The loader holds a copy; copies share the state.
    torchguard::ResumableSampler sampler(train_dataset_size, {/*seed=*/1});
    auto train_loader =
        torch::data::make_data_loader(std::move(train_dataset), sampler,
                                      torch::data::DataLoaderOptions(kTrainBatchSize).workers(2));

    auto test_dataset =
        torch::data::datasets::MNIST(settings.data_root, torch::data::datasets::MNIST::Mode::kTest)
            .map(torch::data::transforms::Normalize<>(0.1307, 0.3081))
            .map(torch::data::transforms::Stack<>());
    const size_t test_dataset_size = test_dataset.size().value();
    // torchguard: in order; the default RandomSampler draws a permutation from the global RNG
    // at every epoch, which moves the RNG that dropout uses.
    auto test_loader = torch::data::make_data_loader<torch::data::samplers::SequentialSampler>(
        std::move(test_dataset), kTestBatchSize);

    // torchguard: shared with the CheckpointGuard.
    auto optimizer = std::make_shared<torch::optim::SGD>(
        model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.5));

    // torchguard: restores the newest checkpoint now (model, optimizer, RNG, step, the sampler's
    // place); saves every N steps, on a stop request, and at the end.
    torchguard::CheckpointOptions checkpoint_options;
    checkpoint_options.directory = settings.checkpoint_dir;
    checkpoint_options.every_n_steps = settings.checkpoint_every;
    checkpoint_options.save_on_exit = torchguard::SaveOnExit::on_success;
    checkpoint_options.stop_token = session.stop_token();
    checkpoint_options.samplers["train"] = sampler;  // its place; the guard's epoch is its epoch
    // torchguard: the settings that decide the arithmetic; a resume with another value is
    // refused, naming both values.
    checkpoint_options.settings.values = {{"--threads", settings.threads},
                                          {"--epochs", settings.epochs},
                                          {"--max-steps", settings.max_steps}};
    checkpoint_options.settings.exact = {"--threads"};
    // torchguard: the run's planned steps: run again once there, it trains nothing.
    const auto steps_per_epoch =
        static_cast<int64_t>((train_dataset_size + kTrainBatchSize - 1) / kTrainBatchSize);
    checkpoint_options.total_steps =
        settings.max_steps > 0 ? std::min(settings.max_steps, settings.epochs * steps_per_epoch)
                               : settings.epochs * steps_per_epoch;
    torchguard::CheckpointGuard checkpoint(model, optimizer, checkpoint_options);
    if (checkpoint.complete()) {
      std::printf("the run is complete at step %lld; parameters %s\n",
                  static_cast<long long>(checkpoint.current_step()),
                  examples::parameter_fingerprint(*model).c_str());
      return 0;
    }
    if (sampler.mid_epoch()) {
      std::printf("resumed mid-epoch: epoch %lld at sample %zu of %zu (step %lld)\n",
                  static_cast<long long>(sampler.epoch() + 1), sampler.position(),
                  train_dataset_size, static_cast<long long>(checkpoint.current_step()));
    }

    // torchguard: from the sampler's epoch; a stop request ends the run.
    bool stopped = false;
    for (size_t epoch = sampler.epoch() + 1; epoch <= static_cast<size_t>(settings.epochs);
         ++epoch) {
      const bool go_on = train(epoch, *model, device, *train_loader, *optimizer, train_dataset_size,
                               sampler, checkpoint, settings.max_steps);
      stopped = checkpoint.stop_requested();
      if (stopped) break;
      test(*model, device, *test_loader, test_dataset_size);
      if (!go_on) break;
    }

    // torchguard: the last save (on success), its error thrown; then the result.
    checkpoint.close(torchguard::Outcome::success);
    if (stopped) {
      std::printf(
          "\ninterrupted at step %lld: checkpoint saved in %s; run the same command to "
          "resume\n",
          static_cast<long long>(checkpoint.current_step()), settings.checkpoint_dir.c_str());
      return torchguard::interrupted_exit_status;
    }
    std::printf("finished at step %lld; parameters %s\n",
                static_cast<long long>(checkpoint.current_step()),
                examples::parameter_fingerprint(*model).c_str());
    return 0;
  });
}

// torchguard: errors end the program with "error: <message>" and status 1, never an abort.
auto main(int argc, char** argv) -> int {
  return torchguard::exit_status([&] { return run(argc, argv); });
}
