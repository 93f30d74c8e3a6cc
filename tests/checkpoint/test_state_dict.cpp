// checkpoint/state_dict.hpp: save_state_dict and load_state_dict, Python's names, checked as
// Python checks them, and a module trained in Python that runs the same in C++.
#include "torchguard/checkpoint.hpp"

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "checkpoint_support.hpp"

namespace fs = std::filesystem;
using torchguard::testing::Contains;
using torchguard::testing::interop_python;
using torchguard::testing::python_side;
using torchguard::testing::TempDir;

TEST_CASE("save_state_dict / load_state_dict: Python's names, crash-safe, checked as Python does",
          "[checkpoint][parts][format]") {
  TempDir dir;
  torch::nn::Sequential saved(torch::nn::Linear(4, 3), torch::nn::BatchNorm1d(3));
  const fs::path path = dir.path / "model.safetensors";
  torchguard::save_state_dict(*saved, path, {{"note", "test"}});
  const torchguard::SafetensorsFile file(path);
  CHECK(file.metadata() == torchguard::SafetensorsMetadata{{"format", "pt"}, {"note", "test"}});
  CHECK(file.names() == std::vector<std::string>{"0.bias", "0.weight", "1.bias",
                                                 "1.num_batches_tracked", "1.running_mean",
                                                 "1.running_var", "1.weight"});

  torch::nn::Sequential same(torch::nn::Linear(4, 3), torch::nn::BatchNorm1d(3));
  const auto result = torchguard::load_state_dict(*same, path);
  CHECK(result.missing_keys.empty());
  CHECK(torch::equal(same[0]->as<torch::nn::Linear>()->weight,
                     saved[0]->as<torch::nn::Linear>()->weight));

  // Everything wrong, in one error; nothing loaded.
  torch::nn::Sequential other(torch::nn::Linear(5, 3), torch::nn::Linear(3, 3));
  const auto before = other[0]->as<torch::nn::Linear>()->bias.clone();
  try {
    torchguard::load_state_dict(*other, path);
    FAIL("no error");
  } catch (const torchguard::StateDictError& e) {
    CHECK(e.missing_keys().empty());
    CHECK(e.unexpected_keys() ==
          std::vector<std::string>{"1.num_batches_tracked", "1.running_mean", "1.running_var"});
    CHECK(e.mismatches() ==
          std::vector<std::string>{
              fmt::format("0.weight: shape [3, 4] in '{}', [3, 5] in the module", path.string()),
              fmt::format("1.weight: shape [3] in '{}', [3, 3] in the module", path.string())});
    CHECK_THAT(std::string(e.what()), Contains("unexpected keys: '1.num_batches_tracked'"));
  }
  CHECK(torch::equal(other[0]->as<torch::nn::Linear>()->bias, before));

  // Non-strict: loads what matches, returns the rest; a dtype differs only on request.
  torch::nn::Sequential smaller(torch::nn::Linear(4, 3));
  const auto partial =
      torchguard::load_state_dict(*smaller, path, torchguard::LoadStateDictOptions{false, false});
  CHECK(partial.unexpected_keys.size() == 5);
  CHECK(torch::equal(smaller[0]->as<torch::nn::Linear>()->bias,
                     saved[0]->as<torch::nn::Linear>()->bias));
  torch::nn::Sequential doubles(torch::nn::Linear(4, 3));
  doubles->to(torch::kFloat64);
  CHECK_THROWS_WITH(
      torchguard::load_state_dict(*doubles, path, torchguard::LoadStateDictOptions{false, false}),
      Contains("0.weight: dtype Float in") && Contains("Double in the module"));
  torchguard::load_state_dict(*doubles, path, torchguard::LoadStateDictOptions{false, true});
  CHECK(torch::allclose(doubles[0]->as<torch::nn::Linear>()->weight.to(torch::kFloat32),
                        saved[0]->as<torch::nn::Linear>()->weight));
  CHECK_THROWS_AS(torchguard::load_state_dict(*same, dir.path / "missing.safetensors"),
                  torchguard::FileError);
}

namespace {

struct SmallNetImpl : torch::nn::Module {  // Small in tests/safetensors_interop.py
  SmallNetImpl()
      : conv(register_module("conv",
                             torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 4, 3).padding(1)))),
        bn(register_module("bn", torch::nn::BatchNorm2d(4))),
        fc(register_module("fc", torch::nn::Linear(4 * 5 * 5, 3))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return fc->forward(torch::relu(bn->forward(conv->forward(x))).flatten(1));
  }
  torch::nn::Conv2d conv;
  torch::nn::BatchNorm2d bn;
  torch::nn::Linear fc;
};
TORCH_MODULE(SmallNet);

}  // namespace

TEST_CASE("interop: a module trained in Python gives the same outputs in C++, and back",
          "[checkpoint][parts][interop]") {
  const std::string python = interop_python("safetensors.torch");
  if (python.empty()) return;  // skipped
  TempDir dir;
  REQUIRE(python_side(python, "train", dir.path));
  SmallNet from_python;
  torchguard::load_state_dict(*from_python, dir.path / "python_model.safetensors");
  from_python->eval();
  const auto io = torchguard::load_safetensors(dir.path / "python_io.safetensors");
  {
    torch::NoGradGuard no_grad;
    const auto outputs = from_python->forward(io.at("inputs"));
    CHECK(torch::allclose(outputs, io.at("outputs"), 1e-5, 1e-6));
  }
  CHECK(from_python->bn->num_batches_tracked.item<std::int64_t>() == 5);

  torch::manual_seed(1);
  SmallNet model;
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  for (int step = 0; step < 5; ++step) {
    const auto x = torch::randn({8, 2, 5, 5});
    const auto loss = (model->forward(x) - x.mean({1, 2, 3}).unsqueeze(1)).pow(2).mean();
    sgd.zero_grad();
    loss.backward();
    sgd.step();
  }
  model->eval();
  const auto inputs = torch::randn({6, 2, 5, 5});
  torch::Tensor outputs;
  {
    torch::NoGradGuard no_grad;
    outputs = model->forward(inputs);
  }
  torchguard::save_state_dict(*model, dir.path / "cpp_model.safetensors");
  torchguard::save_safetensors(dir.path / "cpp_io.safetensors",
                               {{"inputs", inputs}, {"outputs", outputs}});
  CHECK(python_side(python, "check-trained", dir.path));
}
