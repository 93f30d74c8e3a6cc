// train_gan: pytorch/examples' cpp/dcgan/dcgan.cpp on Fashion-MNIST, adopted to torchguard (each
// change is marked "torchguard:"). Two models and two optimizers, one CheckpointGuard:
//   TrainingSession    the run's log (console and <run-dir>/train.log) and metrics.jsonl;
//                      SIGINT/SIGTERM ask for a stop instead of killing the run
//   CheckpointGuard    the generator, the discriminator, both Adam states, the sampler's place
//                      and the RNG in one crash-safe commit: restored all together at start, or
//                      none; saved every --checkpoint-every steps, at once on a stop, at the end
//   ResumableSampler   the training order, a function of the seed and the epoch, and the place
//                      in the epoch, saved in the checkpoint
// Interrupted (Ctrl-C; or kill -9, from the last checkpoint), the same command goes on at the
// next batch and ends with the same parameters, bit for bit, as a run never interrupted (on the
// CPU, with the same --threads): the noise comes from LibTorch's global RNG, which the
// checkpoint restores. The same command after the end says that the run is complete and writes
// nothing.
//
// Smaller than pytorch/examples' networks (a quarter of their channels, noise of 32), so that a
// step takes milliseconds on a CPU; the real labels are 1 (pytorch/examples draws them from
// [0.8, 1)); Adam's betas are the DCGAN paper's (0.5, 0.999); no sample images are written.
//
//   train_gan --run-dir gan-run                (Fashion-MNIST's .gz files in --data-dir)
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>                // torchguard: the settings from the command line
#include <torchguard/torchguard.hpp>  // torchguard

#include "fashion_mnist.hpp"          // torchguard: Fashion-MNIST's .gz files, not MNIST's idx
#include "parameter_fingerprint.hpp"  // torchguard: to compare runs

// The size of the noise vector fed to the generator.
const int64_t kNoiseSize = 32;

using namespace torch;

// torchguard: what was constant is a command-line option.
struct Settings {
  std::string run_dir = "gan-run";  // train.log, metrics.jsonl, checkpoints/
  std::string data_dir = fashion_mnist::kDefaultDir;
  int64_t epochs = 30;
  int64_t max_steps = 0;  // 0: no limit
  int64_t checkpoint_every = 200;
  int64_t batch_size = 64;
  int64_t seed = 1;
  double learning_rate = 2e-4;
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::string restore;  // "" (latest), "latest", "none", a step or a checkpoint's name
  int64_t log_every = 10;
};

struct DCGANGeneratorImpl : nn::Module {
  DCGANGeneratorImpl(int noise_size)
      : conv1(nn::ConvTranspose2dOptions(noise_size, 64, 4).bias(false)),
        conv2(nn::ConvTranspose2dOptions(64, 32, 3).stride(2).padding(1).bias(false)),
        conv3(nn::ConvTranspose2dOptions(32, 16, 4).stride(2).padding(1).bias(false)),
        conv4(nn::ConvTranspose2dOptions(16, 1, 4).stride(2).padding(1).bias(false)),
        // torchguard: in the members' order (-Werror=reorder)
        batch_norm1(64),
        batch_norm2(32),
        batch_norm3(16) {
    // register_module() is needed if we want to use the parameters() method later on
    register_module("conv1", conv1);
    register_module("conv2", conv2);
    register_module("conv3", conv3);
    register_module("conv4", conv4);
    register_module("batch_norm1", batch_norm1);
    register_module("batch_norm2", batch_norm2);
    register_module("batch_norm3", batch_norm3);
  }

  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(batch_norm1(conv1(x)));
    x = torch::relu(batch_norm2(conv2(x)));
    x = torch::relu(batch_norm3(conv3(x)));
    x = torch::tanh(conv4(x));
    return x;
  }

  nn::ConvTranspose2d conv1, conv2, conv3, conv4;
  nn::BatchNorm2d batch_norm1, batch_norm2, batch_norm3;
};

TORCH_MODULE(DCGANGenerator);

// torchguard: Fashion-MNIST's training set from its .gz files, in [0, 1] as MNIST's dataset gives
// it (torch::data::datasets::MNIST reads the uncompressed idx files; Debian ships them gzipped).
class FashionMNIST : public torch::data::datasets::Dataset<FashionMNIST> {
 public:
  explicit FashionMNIST(const std::string& root)
      : images_(fashion_mnist::read_images(fashion_mnist::file_path(root, "train", "images"))
                    .unsqueeze(1)
                    .to(torch::kFloat32)
                    .div_(255)),
        targets_(fashion_mnist::read_labels(fashion_mnist::file_path(root, "train", "labels"))) {}

  torch::data::Example<> get(size_t index) override {
    return {images_[static_cast<int64_t>(index)], targets_[static_cast<int64_t>(index)]};
  }
  c10::optional<size_t> size() const override { return static_cast<size_t>(images_.size(0)); }

 private:
  torch::Tensor images_, targets_;
};

// torchguard: how the training part of the run ended.
enum class Ending { finished, already_complete, interrupted };

int train(const Settings& settings) {
  torch::set_num_threads(settings.threads);  // torchguard: fixed, the arithmetic depends on it
  torch::manual_seed(settings.seed);

  // Create the device we pass around based on whether CUDA is available.
  torch::Device device(torch::kCPU);
  if (torch::cuda::is_available()) {
    std::cout << "CUDA is available! Training on GPU." << std::endl;
    device = torch::Device(torch::kCUDA);
  }

  DCGANGenerator generator(kNoiseSize);
  generator->to(device);

  // One layer part a line, as in pytorch/examples.
  // clang-format off
  nn::Sequential discriminator(
      // Layer 1
      nn::Conv2d(nn::Conv2dOptions(1, 16, 4).stride(2).padding(1).bias(false)),
      nn::LeakyReLU(nn::LeakyReLUOptions().negative_slope(0.2)),
      // Layer 2
      nn::Conv2d(nn::Conv2dOptions(16, 32, 4).stride(2).padding(1).bias(false)),
      nn::BatchNorm2d(32),
      nn::LeakyReLU(nn::LeakyReLUOptions().negative_slope(0.2)),
      // Layer 3
      nn::Conv2d(nn::Conv2dOptions(32, 64, 4).stride(2).padding(1).bias(false)),
      nn::BatchNorm2d(64),
      nn::LeakyReLU(nn::LeakyReLUOptions().negative_slope(0.2)),
      // Layer 4
      nn::Conv2d(nn::Conv2dOptions(64, 1, 3).stride(1).padding(0).bias(false)),
      nn::Sigmoid());
  // clang-format on
  discriminator->to(device);

  // torchguard: shared with the CheckpointGuard.
  auto generator_optimizer = std::make_shared<torch::optim::Adam>(
      generator->parameters(),
      torch::optim::AdamOptions(settings.learning_rate).betas(std::make_tuple(0.5, 0.999)));
  auto discriminator_optimizer = std::make_shared<torch::optim::Adam>(
      discriminator->parameters(),
      torch::optim::AdamOptions(settings.learning_rate).betas(std::make_tuple(0.5, 0.999)));

  // torchguard: the run's log and metrics; SIGINT/SIGTERM ask for a stop. The stack closes the
  // CheckpointGuard, then the session, where their errors still make the exit status.
  const std::filesystem::path run_dir = settings.run_dir;
  torchguard::TrainingSessionOptions session_options;
  session_options.log_file = run_dir / "train.log";
  session_options.metrics_file = run_dir / "metrics.jsonl";
  session_options.handle_signals = true;
  torchguard::ScopeStack stack;
  auto& session = stack.emplace<torchguard::TrainingSession>("dcgan", session_options);

  int64_t end_step = 0;
  const Ending ending = session.run([&] {
    auto dataset = FashionMNIST(settings.data_dir)
                       .map(torch::data::transforms::Normalize<>(0.5, 0.5))
                       .map(torch::data::transforms::Stack<>());
    const size_t dataset_size = dataset.size().value();
    const int64_t batches_per_epoch =
        std::ceil(dataset_size / static_cast<double>(settings.batch_size));

    // torchguard: the order is a function of the seed and the epoch; the place in the epoch is
    // in the checkpoint. The loader holds a copy; copies share the state.
    torchguard::ResumableSampler sampler(dataset_size,
                                         {/*seed=*/static_cast<uint64_t>(settings.seed)});

    // torchguard: both models, both optimizers, the sampler and the RNG in one commit, restored
    // now (all of them, or none: a fresh start).
    torchguard::CheckpointOptions options;
    options.directory = run_dir / "checkpoints";
    options.models = {{"generator", generator}, {"discriminator", discriminator}};
    options.optimizers = {{"generator", generator_optimizer},
                          {"discriminator", discriminator_optimizer}};
    options.samplers = {{"train", sampler}};
    options.settings.values = {{"--batch-size", settings.batch_size},
                               {"--seed", settings.seed},
                               {"--lr", settings.learning_rate},
                               {"--threads", settings.threads}};
    options.settings.exact = {"--batch-size", "--seed", "--threads"};  // a change refuses
    options.total_steps = settings.epochs * batches_per_epoch;
    if (settings.max_steps > 0) {
      options.total_steps = std::min(options.total_steps, settings.max_steps);
    }
    options.restore = settings.restore;
    options.every_n_steps = settings.checkpoint_every;
    options.save_on_exit = torchguard::SaveOnExit::on_success;  // a failed step is not trained
    options.stop_token = session.stop_token();
    options.after_save = [&session] { session.flush(); };  // metrics on disk as far as the save
    torchguard::CheckpointGuard* guard = nullptr;
    try {
      guard = &stack.emplace<torchguard::CheckpointGuard>(options);
    } catch (const torchguard::NoValidCheckpointError& e) {
      // The library's message names its option; the program names its flag.
      throw torchguard::NoValidCheckpointError(std::string(e.what()) +
                                               "; pass --restore none to start fresh");
    }
    auto& checkpoint = *guard;
    // torchguard: the restored optimizers carry the learning rate of the run that saved them;
    // this run's --lr wins (the guard warned of a change).
    for (auto* optimizer : {generator_optimizer.get(), discriminator_optimizer.get()}) {
      for (auto& group : optimizer->param_groups()) {
        static_cast<torch::optim::AdamOptions&>(group.options()).lr(settings.learning_rate);
      }
    }
    session.resume_metrics(checkpoint.current_step());  // the steps past it are trained again
    session.set_step(checkpoint.current_step());
    end_step = checkpoint.current_step();
    if (checkpoint.complete()) return Ending::already_complete;
    if (checkpoint.resumed()) {
      std::printf("resumed from step %lld (epoch %lld, sample %zu)\n",
                  static_cast<long long>(checkpoint.current_step()),
                  static_cast<long long>(checkpoint.epoch() + 1), sampler.position());
      std::fflush(stdout);  // before the first step: a run killed later still said it
    }

    auto data_loader = torch::data::make_data_loader(
        std::move(dataset), sampler,  // torchguard: the sampler
        torch::data::DataLoaderOptions().batch_size(settings.batch_size).workers(1));

    // torchguard: until the total of steps (--epochs, --max-steps), from the restored epoch and
    // place; a stop request ends the run.
    bool stopped = false;
    while (!checkpoint.complete() && !stopped) {
      const int64_t epoch = checkpoint.epoch() + 1;
      int64_t batch_index = static_cast<int64_t>(sampler.position()) / settings.batch_size;
      // torchguard: resume() goes on where the sampler's state says, and counts the batches the
      // loop receives (the loader fetches ahead).
      for (torch::data::Example<>& batch : torchguard::resume(*data_loader, sampler)) {
        // Train discriminator with real images.
        discriminator->zero_grad();
        torch::Tensor real_images = batch.data.to(device);
        torch::Tensor real_labels = torch::ones(batch.data.size(0), device);
        torch::Tensor real_output =
            discriminator->forward(real_images).reshape(real_labels.sizes());
        torch::Tensor d_loss_real = torch::binary_cross_entropy(real_output, real_labels);
        d_loss_real.backward();

        // Train discriminator with fake images.
        // torchguard: from the global RNG, which the checkpoint saves and restores.
        torch::Tensor noise = torch::randn({batch.data.size(0), kNoiseSize, 1, 1}, device);
        torch::Tensor fake_images = generator->forward(noise);
        torch::Tensor fake_labels = torch::zeros(batch.data.size(0), device);
        torch::Tensor fake_output =
            discriminator->forward(fake_images.detach()).reshape(fake_labels.sizes());
        torch::Tensor d_loss_fake = torch::binary_cross_entropy(fake_output, fake_labels);
        d_loss_fake.backward();

        torch::Tensor d_loss = d_loss_real + d_loss_fake;
        discriminator_optimizer->step();

        // Train generator.
        generator->zero_grad();
        fake_labels.fill_(1);
        fake_output = discriminator->forward(fake_images).reshape(fake_labels.sizes());
        torch::Tensor g_loss = torch::binary_cross_entropy(fake_output, fake_labels);
        g_loss.backward();
        generator_optimizer->step();

        batch_index++;
        // torchguard: logged by the run's step, before the step's checkpoint: a resumed run's
        // metrics.jsonl holds each step once.
        const int64_t step = checkpoint.current_step() + 1;
        const float d_value = d_loss.item<float>(), g_value = g_loss.item<float>();
        if (step % settings.log_every == 0) {
          std::printf("\r[%2lld/%2lld][%3lld/%3lld] D_loss: %.4f | G_loss: %.4f\n",
                      static_cast<long long>(epoch), static_cast<long long>(settings.epochs),
                      static_cast<long long>(batch_index),
                      static_cast<long long>(batches_per_epoch), d_value, g_value);
          session.log_metrics(step, {{"epoch", epoch}, {"d_loss", d_value}, {"g_loss", g_value}});
        }

        // torchguard: the step is done (the session's end names it, also when its save fails):
        // a checkpoint every N steps, at the last one, and at once on a stop request.
        session.set_step(step);
        const auto result = checkpoint.step({{"d_loss", d_value}, {"g_loss", g_value}});
        if (result.stop) {
          stopped = true;
          break;
        }
        if (checkpoint.complete()) break;
      }
    }
    // torchguard: the last save, its error thrown: the run's error.
    checkpoint.close(torchguard::Outcome::success);
    end_step = checkpoint.current_step();
    return stopped ? Ending::interrupted : Ending::finished;
  });
  // torchguard: the session's end ("completed successfully", "stopped at step N by SIGINT"); a
  // log or metrics file that could not be written throws here: status 1.
  stack.close();

  switch (ending) {
    case Ending::already_complete:
      std::printf("the run is complete at step %lld; nothing to train\n",
                  static_cast<long long>(end_step));
      break;
    case Ending::interrupted:
      std::printf(
          "interrupted at step %lld: checkpoint saved in %s; run the same command to resume\n",
          static_cast<long long>(end_step), (run_dir / "checkpoints").c_str());
      break;
    case Ending::finished:
      std::printf("Training complete at step %lld!\n", static_cast<long long>(end_step));
      break;
  }
  // torchguard: both models in one fingerprint, to compare runs.
  std::printf("parameters %s\n",
              examples::parameter_fingerprint({*generator, *discriminator}).c_str());
  return ending == Ending::interrupted ? torchguard::interrupted_exit_status : 0;
}

// torchguard: errors end the program with "error: <message>" and status 1, never an abort.
int main(int argc, char** argv) {
  Settings settings;
  CLI::App app{
      "pytorch/examples' DCGAN on Fashion-MNIST, adopted to torchguard: Ctrl-C saves a "
      "checkpoint of both models and both optimizers; the same command resumes at the next "
      "batch."};
  app.add_option("--run-dir", settings.run_dir, "train.log, metrics.jsonl and checkpoints/")
      ->capture_default_str();
  app.add_option("--data-dir", settings.data_dir, "Fashion-MNIST's .gz files")
      ->capture_default_str();
  app.add_option("--epochs", settings.epochs)->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--max-steps", settings.max_steps, "stop after this many steps (0: no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--checkpoint-every", settings.checkpoint_every, "steps between checkpoints")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--batch-size", settings.batch_size)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--seed", settings.seed, "the initial weights, the noise and the order")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--lr", settings.learning_rate, "Adam's learning rate, for both models")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--threads", settings.threads, "intra-op threads (the results depend on it)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--restore", settings.restore,
                 "the checkpoint to resume from: latest (the newest intact one), none (start "
                 "fresh), a step, or a checkpoint's name")
      ->capture_default_str();
  app.add_option("--log-every", settings.log_every, "steps between lines of losses")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  return torchguard::exit_status([&] { return train(settings); });
}
