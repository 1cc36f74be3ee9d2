// FrameDecoder / frame(): [u32 big-endian length][payload], reassembled from chunks cut
// anywhere, bounded before allocation, failure is sticky.
#include "cardbridge/protocol/framing.hpp"

#include <cstdint>
#include <numeric>
#include <vector>

#include <gtest/gtest.h>

namespace cardbridge::protocol {
namespace {

using Bytes = std::vector<uint8_t>;

Bytes payload_of(std::size_t n, uint8_t seed) {
  Bytes p(n);
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(seed + i * 7);
  return p;
}

Bytes header(uint32_t len) {
  return {static_cast<uint8_t>(len >> 24), static_cast<uint8_t>(len >> 16),
          static_cast<uint8_t>(len >> 8), static_cast<uint8_t>(len)};
}

Bytes concat(const std::vector<Bytes>& parts) {
  Bytes out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

std::vector<Bytes> drain(FrameDecoder& d) {
  std::vector<Bytes> out;
  while (auto f = d.next()) out.push_back(std::move(*f));
  return out;
}

// Feeds |stream| in pieces cut at |cuts| (sorted offsets) and returns every frame.
std::vector<Bytes> feed_cut(const Bytes& stream, const std::vector<std::size_t>& cuts,
                            std::size_t max = kDefaultMaxFrame) {
  FrameDecoder d(max);
  std::vector<Bytes> out;
  std::size_t prev = 0;
  auto push = [&](std::size_t end) {
    EXPECT_TRUE(d.feed(std::span<const uint8_t>(stream.data() + prev, end - prev)));
    prev = end;
    for (auto& f : drain(d)) out.push_back(std::move(f));
  };
  for (std::size_t c : cuts) push(c);
  push(stream.size());
  EXPECT_EQ(d.buffered(), 0u);
  EXPECT_FALSE(d.failed());
  return out;
}

TEST(FrameTest, HeaderIsBigEndianLength) {
  Bytes p = payload_of(0x0102, 1);
  Bytes f = frame(p);
  ASSERT_EQ(f.size(), 4u + 0x0102);
  EXPECT_EQ(f[0], 0x00);
  EXPECT_EQ(f[1], 0x00);
  EXPECT_EQ(f[2], 0x01);
  EXPECT_EQ(f[3], 0x02);
  EXPECT_TRUE(std::equal(p.begin(), p.end(), f.begin() + 4));
}

TEST(FrameTest, LargeLengthUsesAllFourBytes) {
  Bytes p = payload_of(0x012345, 9);
  Bytes f = frame(p);
  EXPECT_EQ((Bytes{f[0], f[1], f[2], f[3]}), (Bytes{0x00, 0x01, 0x23, 0x45}));
}

TEST(FrameTest, RoundTripThroughDecoder) {
  for (std::size_t n : {1u, 2u, 3u, 4u, 5u, 255u, 256u, 1600u, 65548u}) {
    Bytes p = payload_of(n, static_cast<uint8_t>(n));
    FrameDecoder d;
    ASSERT_TRUE(d.feed(frame(p)));
    auto got = d.next();
    ASSERT_TRUE(got.has_value()) << n;
    EXPECT_EQ(*got, p);
    EXPECT_FALSE(d.next().has_value());
    EXPECT_EQ(d.buffered(), 0u);
  }
}

TEST(FrameDecoderTest, NothingUntilComplete) {
  FrameDecoder d;
  Bytes f = frame(payload_of(10, 3));
  ASSERT_TRUE(d.feed(std::span(f).first(13)));
  EXPECT_FALSE(d.next().has_value());
  EXPECT_EQ(d.buffered(), 13u);
  ASSERT_TRUE(d.feed(std::span(f).subspan(13)));
  auto got = d.next();
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(*got, payload_of(10, 3));
  EXPECT_EQ(d.buffered(), 0u);
}

TEST(FrameDecoderTest, OneByteChunks) {
  std::vector<Bytes> payloads = {payload_of(1, 1), payload_of(300, 2), payload_of(5, 3)};
  Bytes stream;
  for (const auto& p : payloads) {
    auto f = frame(p);
    stream.insert(stream.end(), f.begin(), f.end());
  }
  std::vector<std::size_t> cuts(stream.size() - 1);
  std::iota(cuts.begin(), cuts.end(), 1);
  EXPECT_EQ(feed_cut(stream, cuts), payloads);
}

TEST(FrameDecoderTest, EverySingleSplitPoint) {
  std::vector<Bytes> payloads = {payload_of(7, 1), payload_of(1, 2), payload_of(20, 3)};
  Bytes stream = concat({frame(payloads[0]), frame(payloads[1]), frame(payloads[2])});
  for (std::size_t k = 0; k <= stream.size(); ++k) {
    SCOPED_TRACE(k);
    EXPECT_EQ(feed_cut(stream, {k}), payloads);
  }
}

TEST(FrameDecoderTest, EveryPairOfSplitPoints) {
  std::vector<Bytes> payloads = {payload_of(6, 10), payload_of(2, 20), payload_of(9, 30)};
  Bytes stream = concat({frame(payloads[0]), frame(payloads[1]), frame(payloads[2])});
  for (std::size_t a = 0; a <= stream.size(); ++a) {
    for (std::size_t b = a; b <= stream.size(); ++b) {
      SCOPED_TRACE(testing::Message() << a << "," << b);
      ASSERT_EQ(feed_cut(stream, {a, b}), payloads);
    }
  }
}

TEST(FrameDecoderTest, StaticChannelChunksOf1600) {
  // Sizes around the chunk size and one extended APDU, as an RDP static channel delivers.
  std::vector<Bytes> payloads;
  for (std::size_t n : {1u, 1595u, 1596u, 1597u, 1600u, 3196u, 70000u, 12u, 65548u, 4u})
    payloads.push_back(payload_of(n, static_cast<uint8_t>(n)));
  Bytes stream;
  for (const auto& p : payloads) {
    auto f = frame(p);
    stream.insert(stream.end(), f.begin(), f.end());
  }
  std::vector<std::size_t> cuts;
  for (std::size_t c = 1600; c < stream.size(); c += 1600) cuts.push_back(c);
  EXPECT_EQ(feed_cut(stream, cuts), payloads);
}

TEST(FrameDecoderTest, ManyFramesInOneChunk) {
  std::vector<Bytes> payloads;
  Bytes stream;
  for (std::size_t i = 0; i < 500; ++i) {
    payloads.push_back(payload_of(1 + i % 37, static_cast<uint8_t>(i)));
    auto f = frame(payloads.back());
    stream.insert(stream.end(), f.begin(), f.end());
  }
  FrameDecoder d;
  ASSERT_TRUE(d.feed(stream));
  EXPECT_EQ(drain(d), payloads);
  EXPECT_EQ(d.buffered(), 0u);
}

TEST(FrameDecoderTest, ManyFramesEndingWithPartialOne) {
  Bytes stream = concat({frame(payload_of(3, 1)), frame(payload_of(4, 2)), frame(payload_of(50, 3))});
  FrameDecoder d;
  ASSERT_TRUE(d.feed(std::span(stream).first(stream.size() - 10)));
  auto got = drain(d);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(d.buffered(), 4u + 50 - 10);
  ASSERT_TRUE(d.feed(std::span(stream).last(10)));
  got = drain(d);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], payload_of(50, 3));
}

TEST(FrameDecoderTest, LongStreamCompactsAndStaysCorrect) {
  // Enough traffic to cross the internal compaction threshold many times, in odd chunks.
  std::vector<Bytes> payloads;
  Bytes stream;
  for (std::size_t i = 0; i < 2000; ++i) {
    payloads.push_back(payload_of(1 + (i * 131) % 700, static_cast<uint8_t>(i)));
    auto f = frame(payloads.back());
    stream.insert(stream.end(), f.begin(), f.end());
  }
  std::vector<std::size_t> cuts;
  for (std::size_t c = 997; c < stream.size(); c += 997) cuts.push_back(c);
  EXPECT_EQ(feed_cut(stream, cuts), payloads);
}

TEST(FrameDecoderTest, MaxSizeFrameAccepted) {
  constexpr std::size_t kMax = 1000;
  Bytes p = payload_of(kMax, 5);
  FrameDecoder d(kMax);
  ASSERT_TRUE(d.feed(frame(p)));
  auto got = d.next();
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(*got, p);
  EXPECT_FALSE(d.failed());
}

TEST(FrameDecoderTest, DefaultMaxSizeFrameAccepted) {
  Bytes p = payload_of(kDefaultMaxFrame, 6);
  FrameDecoder d;
  ASSERT_TRUE(d.feed(frame(p)));
  auto got = d.next();
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->size(), kDefaultMaxFrame);
}

TEST(FrameDecoderTest, MaxPlusOneRejectedFromTheHeaderAlone) {
  constexpr std::size_t kMax = 1000;
  FrameDecoder d(kMax);
  // Only the header: the decoder must refuse without waiting for (or buffering) the body.
  EXPECT_FALSE(d.feed(header(kMax + 1)));
  EXPECT_TRUE(d.failed());
  ASSERT_TRUE(d.error().has_value());
  EXPECT_EQ(*d.error(), FrameError::kTooLarge);
  EXPECT_LE(d.buffered(), 4u);
  EXPECT_FALSE(d.next().has_value());
}

TEST(FrameDecoderTest, DefaultMaxPlusOneRejected) {
  FrameDecoder d;
  EXPECT_FALSE(d.feed(header(static_cast<uint32_t>(kDefaultMaxFrame + 1))));
  EXPECT_EQ(d.error(), FrameError::kTooLarge);
}

TEST(FrameDecoderTest, HugeLengthRejectedEvenWhenHeaderArrivesByteByByte) {
  FrameDecoder d;
  Bytes h = header(0xFFFFFFFFu);
  EXPECT_TRUE(d.feed(std::span(h).first(1)));
  EXPECT_TRUE(d.feed(std::span(h).subspan(1, 1)));
  EXPECT_TRUE(d.feed(std::span(h).subspan(2, 1)));
  EXPECT_FALSE(d.failed());
  EXPECT_FALSE(d.feed(std::span(h).subspan(3, 1)));
  EXPECT_EQ(d.error(), FrameError::kTooLarge);
}

TEST(FrameDecoderTest, ZeroLengthRejected) {
  FrameDecoder d;
  EXPECT_FALSE(d.feed(header(0)));
  EXPECT_TRUE(d.failed());
  EXPECT_EQ(d.error(), FrameError::kEmpty);
  EXPECT_FALSE(d.next().has_value());
}

TEST(FrameDecoderTest, FailureIsSticky) {
  FrameDecoder d;
  ASSERT_FALSE(d.feed(header(0)));
  Bytes good = frame(payload_of(5, 1));
  EXPECT_FALSE(d.feed(good));
  EXPECT_FALSE(d.next().has_value());
  EXPECT_TRUE(d.failed());
  EXPECT_EQ(d.error(), FrameError::kEmpty);
  EXPECT_FALSE(d.feed(good));
  EXPECT_EQ(d.error(), FrameError::kEmpty);  // the first error is kept
}

TEST(FrameDecoderTest, FramesBeforeABadHeaderAreStillDelivered) {
  Bytes p1 = payload_of(3, 1), p2 = payload_of(8, 2);
  Bytes stream = concat({frame(p1), frame(p2), header(0x7FFFFFFF), payload_of(20, 3)});
  FrameDecoder d;
  EXPECT_FALSE(d.feed(stream));
  EXPECT_TRUE(d.failed());
  EXPECT_EQ(d.error(), FrameError::kTooLarge);
  auto got = drain(d);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0], p1);
  EXPECT_EQ(got[1], p2);
}

TEST(FrameDecoderTest, FramesBeforeAnEmptyFrameAreStillDelivered) {
  Bytes p1 = payload_of(3, 1);
  Bytes stream = concat({frame(p1), header(0), frame(payload_of(4, 2))});
  FrameDecoder d;
  EXPECT_FALSE(d.feed(stream));
  EXPECT_EQ(d.error(), FrameError::kEmpty);
  auto got = drain(d);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], p1);
}

TEST(FrameDecoderTest, FrameCompletedInTheSameFeedAsABadHeaderIsDelivered) {
  Bytes p1 = payload_of(40, 1);
  Bytes f1 = frame(p1);
  FrameDecoder d;
  ASSERT_TRUE(d.feed(std::span(f1).first(10)));
  Bytes rest = concat({Bytes(f1.begin() + 10, f1.end()), header(0)});
  EXPECT_FALSE(d.feed(rest));
  auto got = drain(d);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], p1);
}

TEST(FrameDecoderTest, EmptyFeedIsHarmless) {
  FrameDecoder d;
  EXPECT_TRUE(d.feed({}));
  EXPECT_FALSE(d.next().has_value());
  EXPECT_EQ(d.buffered(), 0u);
}

TEST(FrameDecoderTest, NextAfterDrainKeepsWorking) {
  FrameDecoder d;
  for (int round = 0; round < 3; ++round) {
    Bytes p = payload_of(10 + static_cast<std::size_t>(round), static_cast<uint8_t>(round));
    ASSERT_TRUE(d.feed(frame(p)));
    auto got = d.next();
    ASSERT_TRUE(got.has_value());
    EXPECT_EQ(*got, p);
    EXPECT_FALSE(d.next().has_value());
    EXPECT_FALSE(d.next().has_value());
  }
}

TEST(FrameErrorTest, ToStringDistinguishesErrors) {
  EXPECT_NE(to_string(FrameError::kTooLarge), to_string(FrameError::kEmpty));
  EXPECT_FALSE(to_string(FrameError::kTooLarge).empty());
  EXPECT_FALSE(to_string(FrameError::kEmpty).empty());
}

}  // namespace
}  // namespace cardbridge::protocol
