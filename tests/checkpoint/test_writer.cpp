// checkpoint/writer.hpp: the background writer.
#include "torchguard/checkpoint/writer.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "checkpoint_support.hpp"

namespace cp = torchguard::detail;
using torchguard::CheckpointError;
using torchguard::testing::Contains;

TEST_CASE("the writer writes in order and a failed write surfaces at the next wait, once",
          "[checkpoint][parts][writer]") {
  std::vector<std::int64_t> written;
  cp::BackgroundWriter writer([&](cp::Snapshot& snapshot) {
    if (snapshot.step == 2) throw CheckpointError("disk on fire");
    written.push_back(snapshot.step);
  });
  for (std::int64_t step = 1; step <= 3; ++step) {
    auto snapshot = std::make_unique<cp::Snapshot>();
    snapshot->step = step;
    if (step == 3) CHECK_THROWS_WITH(writer.wait(), Contains("disk on fire"));
    writer.submit(std::move(snapshot));
    if (step == 1) writer.wait();
  }
  writer.wait();
  CHECK(written == std::vector<std::int64_t>{1, 3});
  writer.stop();
  writer.stop();
}
