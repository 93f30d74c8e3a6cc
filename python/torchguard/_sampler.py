"""ResumableSampler's order, reproduced: epoch e's permutation of 0..size-1 is a Fisher-Yates
shuffle driven by std::mt19937_64 seeded with std::seed_seq{seed lo, seed hi, e lo, e hi}, with
unbiased bounded draws (rejection of the 2^64 mod bound lowest values), exactly as
include/torchguard/data/resumable_sampler.hpp does it. Both engines are specified to the bit by
the C++ standard ([rand.util.seedseq], [rand.eng.mers]), so a Python loop that resumes a C++
run draws the batches C++ would have drawn."""

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _seed_seq(values, count):
    """std::seed_seq(values).generate() of `count` 32-bit words."""
    s = len(values)
    n = count
    t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
    p = (n - t) // 2
    q = p + t
    m = max(s + 1, n)
    out = [0x8B8B8B8B] * n

    def T(x):
        return x ^ (x >> 27)

    for k in range(m):
        r1 = (1664525 * T(out[k % n] ^ out[(k + p) % n] ^ out[(k - 1) % n])) & _MASK32
        if k == 0:
            r2 = (r1 + s) & _MASK32
        elif k <= s:
            r2 = (r1 + k % n + values[k - 1]) & _MASK32
        else:
            r2 = (r1 + k % n) & _MASK32
        out[(k + p) % n] = (out[(k + p) % n] + r1) & _MASK32
        out[(k + q) % n] = (out[(k + q) % n] + r2) & _MASK32
        out[k % n] = r2
    for k in range(m, m + n):
        r3 = (1566083941 * T((out[k % n] + out[(k + p) % n] + out[(k - 1) % n]) & _MASK32)) & _MASK32
        r4 = (r3 - k % n) & _MASK32
        out[(k + p) % n] ^= r3
        out[(k + q) % n] ^= r4
        out[k % n] = r4
    return out


class _MT19937_64:
    """std::mt19937_64, seeded from a seed_seq."""

    N, M = 312, 156
    UPPER, LOWER = 0xFFFFFFFF80000000, 0x7FFFFFFF

    def __init__(self, seed_words):
        words = _seed_seq(seed_words, 2 * self.N)
        x = [words[2 * i] | (words[2 * i + 1] << 32) for i in range(self.N)]
        if (x[0] & self.UPPER) == 0 and not any(x[1:]):
            x[0] = 1 << 63
        self.state = x
        self.index = self.N

    def _twist(self):
        x = self.state
        for i in range(self.N):
            y = (x[i] & self.UPPER) | (x[(i + 1) % self.N] & self.LOWER)
            value = x[(i + self.M) % self.N] ^ (y >> 1)
            if y & 1:
                value ^= 0xB5026F5AA96619E9
            x[i] = value
        self.index = 0

    def __call__(self):
        if self.index >= self.N:
            self._twist()
        y = self.state[self.index]
        self.index += 1
        y ^= (y >> 29) & 0x5555555555555555
        y ^= (y << 17) & 0x71D67FFFEDA60000
        y ^= (y << 37) & 0xFFF7EEE000000000
        y ^= y >> 43
        return y & _MASK64


def permutation(size, seed, epoch):
    """ResumableSampler::permutation(size, seed, epoch): epoch `epoch`'s order of 0..size-1."""
    seed &= _MASK64
    epoch &= _MASK64
    engine = _MT19937_64([seed & _MASK32, seed >> 32, epoch & _MASK32, epoch >> 32])
    order = list(range(size))
    for i in range(size, 1, -1):
        threshold = ((1 << 64) - i) % i
        while True:
            draw = engine()
            if draw >= threshold:
                break
        j = draw % i
        order[i - 1], order[j] = order[j], order[i - 1]
    return order


class ResumableSampler:
    """A sampler's place in its epoch, as C++'s ResumableSampler keeps it (its checkpoint_state():
    epoch, consumed, size, seed, shuffle). For a loop that assembles its own batches:

        sampler = torchguard.ResumableSampler(len(dataset), seed=1, state=checkpoint.samplers["train"])
        indices = sampler.remaining()        # this epoch's samples not trained yet, in order
        ... train a batch of n of them ...
        sampler.consume(n)                   # or sampler.next_epoch() after the epoch's last
    """

    def __init__(self, size, seed=0, shuffle=True, state=None):
        self.size = int(size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self.skipped = []  # dataset indices left out of every epoch (sorted), as C++'s skip()
        if state is not None:
            self.load_checkpoint_state(state)

    def checkpoint_state(self):
        return {"epoch": self.epoch, "consumed": self.position, "size": self.size,
                "seed": self.seed, "shuffle": self.shuffle, "skip": list(self.skipped)}

    def load_checkpoint_state(self, state):
        from ._errors import CheckpointError

        try:
            size, seed, shuffle = int(state["size"]), int(state["seed"]), bool(state["shuffle"])
            epoch, consumed = int(state["epoch"]), int(state["consumed"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"the saved state {state!r} is not a ResumableSampler's") from None
        if (size, seed, shuffle) != (self.size, self.seed, self.shuffle):
            raise CheckpointError(
                f"the saved state is of a sampler over {size} samples (seed {seed}, "
                f"{'shuffled' if shuffle else 'in order'}), this one is over {self.size} samples "
                f"(seed {self.seed}, {'shuffled' if self.shuffle else 'in order'}): going on from "
                "it would skip or repeat samples; use the same dataset and seed")
        skipped = sorted(set(int(index) for index in state.get("skip", [])))
        if any(not 0 <= index < size for index in skipped):
            raise CheckpointError(f"the saved skip list {skipped} is not a list of sample indices "
                                  f"below {size}")
        if epoch < 0 or not 0 <= consumed <= size - len(skipped):
            raise CheckpointError(f"the saved state says epoch {epoch}, {consumed} samples done, "
                                  f"of {size - len(skipped)}: not a position")
        self.epoch, self.position, self.skipped = epoch, consumed, skipped

    def order(self, epoch=None):
        """The whole order of `epoch` (default: the current one), without the skipped samples."""
        epoch = self.epoch if epoch is None else epoch
        order = permutation(self.size, self.seed, epoch) if self.shuffle else list(range(self.size))
        if self.skipped:
            skipped = set(self.skipped)
            order = [index for index in order if index not in skipped]
        return order

    def skip(self, indices):
        """Leaves `indices` out of the rest of this epoch and of every later one, as C++'s
        ResumableSampler::skip() does; returns how many were not left out already."""
        added = sorted(set(int(i) for i in indices) - set(self.skipped))
        if any(not 0 <= index < self.size for index in added):
            raise ValueError(f"skip({added}) of a dataset of {self.size} samples")
        if added:
            trained = set(self.order()[:self.position])
            self.position -= sum(1 for index in added if index in trained)
            self.skipped = sorted(set(self.skipped) | set(added))
        return len(added)

    def remaining(self):
        return self.order()[self.position:]

    def consume(self, count):
        length = self.size - len(self.skipped)
        if count > length - self.position:
            raise ValueError(f"consume({count}) with {length - self.position} of {length} "
                             f"samples of epoch {self.epoch} left")
        self.position += count

    def next_epoch(self):
        self.epoch += 1
        self.position = 0
