// The desk's speculation rules (pure): what it predicts a program sends next.
#include "cardbridge/desk_core/speculation.hpp"

#include <gtest/gtest.h>

namespace cardbridge::client {
namespace {

using Bytes = std::vector<uint8_t>;

Bytes ok(Bytes data) {
  data.push_back(0x90);
  data.push_back(0x00);
  return data;
}

// FCP of a transparent EF of |size| bytes (tag 80), as cb-cardsim and CPS cards give it.
Bytes fcp(uint16_t size) {
  return {0x62, 0x0B, 0x80, 0x02, static_cast<uint8_t>(size >> 8), static_cast<uint8_t>(size), 0x82, 0x01, 0x01,
          0x83, 0x02, 0xD0, 0x03};
}

TEST(FcpFileSize, Tag80InFcp) {
  EXPECT_EQ(fcp_file_size(fcp(0x0708)), 0x708u);
  EXPECT_EQ(fcp_file_size(Bytes{0x62, 0x04, 0x80, 0x02, 0x07, 0x08}), 0x708u);
}

TEST(FcpFileSize, Tag81WhenNo80AndNestedFcpInFci) {
  EXPECT_EQ(fcp_file_size(Bytes{0x62, 0x03, 0x81, 0x01, 0x20}), 0x20u);
  EXPECT_EQ(fcp_file_size(Bytes{0x6F, 0x06, 0x62, 0x04, 0x80, 0x02, 0x01, 0x00}), 0x100u);
  // tag 80 wins over 81 whatever the order
  EXPECT_EQ(fcp_file_size(Bytes{0x62, 0x06, 0x81, 0x01, 0x40, 0x80, 0x01, 0x30}), 0x30u);
}

TEST(FcpFileSize, AbsentOrMalformed) {
  EXPECT_FALSE(fcp_file_size(Bytes{}));
  EXPECT_FALSE(fcp_file_size(Bytes{0x62, 0x03, 0x82, 0x01, 0x38}));  // a DF: no size
  EXPECT_FALSE(fcp_file_size(Bytes{0x62, 0x05, 0x80, 0x02, 0x01}));  // truncated
  EXPECT_FALSE(fcp_file_size(Bytes{0x70, 0x04, 0x80, 0x02, 0x01, 0x00}));  // not an FCP/FCI
  EXPECT_FALSE(fcp_file_size(Bytes{0x62, 0x84, 0x80}));                 // length form not supported
}

TEST(ParseReadBinary, OffsetModeOnly) {
  auto rb = parse_read_binary(Bytes{0x00, 0xB0, 0x01, 0x02, 0xE7});
  ASSERT_TRUE(rb);
  EXPECT_EQ(rb->offset, 0x102u);
  EXPECT_EQ(rb->le, 0xE7u);
  EXPECT_EQ(parse_read_binary(Bytes{0x00, 0xB0, 0x00, 0x00, 0x00})->le, 256u);
  EXPECT_FALSE(parse_read_binary(Bytes{0x00, 0xB0, 0x81, 0x00, 0x10}));  // short EF id mode
  EXPECT_FALSE(parse_read_binary(Bytes{0x00, 0xB0, 0x00, 0x00}));        // no Le
  EXPECT_FALSE(parse_read_binary(Bytes{0x00, 0xB1, 0x00, 0x00, 0x10}));  // odd INS
}

TEST(GetResponseFor, KeepsChannelDropsSecureMessaging) {
  EXPECT_EQ(get_response_for(Bytes{0x00, 0xA4, 0x09, 0x04}, 0x1B), (Bytes{0x00, 0xC0, 0x00, 0x00, 0x1B}));
  EXPECT_EQ(get_response_for(Bytes{0x0D, 0xA4, 0x09, 0x04}, 0x10), (Bytes{0x01, 0xC0, 0x00, 0x00, 0x10}));
  EXPECT_EQ(get_response_for(Bytes{0x80, 0x88, 0x00, 0x00}, 0x00), (Bytes{0x00, 0xC0, 0x00, 0x00, 0x00}));
}

TEST(PredictReads, KnownChunkCoversTheRestOfTheFile) {
  const auto reads = predict_reads(0x00, 0xE7, 0x200, 0xE7);
  ASSERT_EQ(reads.size(), 2u);
  EXPECT_EQ(reads[0], (Bytes{0x00, 0xB0, 0x00, 0xE7, 0xE7}));
  EXPECT_EQ(reads[1], (Bytes{0x00, 0xB0, 0x01, 0xCE, 0x32}));  // the tail: 0x200 - 0x1CE
}

TEST(PredictReads, NothingWhileTheChunkSizeIsUnknown) {
  EXPECT_TRUE(predict_reads(0x00, 0, 0x0C, 0).empty());
  EXPECT_TRUE(predict_reads(0x00, 0, 248, 0).empty());
  EXPECT_TRUE(predict_reads(0x00, 0x10, 0x20, 0).empty());
}

TEST(PredictReads, Bounded) {
  const auto reads = predict_reads(0x00, 0, 0x7FFF, 0x10);
  EXPECT_EQ(reads.size(), kMaxSpeculativeReads);
  std::size_t bytes = 0;
  for (const auto& r : predict_reads(0x00, 0, 0x7FFF, 256)) bytes += r[4] == 0 ? 256u : std::size_t{r[4]};
  EXPECT_LE(bytes, kMaxSpeculativeBytes);
  EXPECT_TRUE(predict_reads(0x00, 0, 0x100, 300).empty());
  EXPECT_TRUE(predict_reads(0x00, 0x9000, 0xA000, 0x10).empty());  // beyond offset-mode range
}

TEST(Observe, SelectThenGetResponseGivesAFreshSize) {
  CardTrack t;
  observe(t, Bytes{0x00, 0xA4, 0x09, 0x04, 0x02, 0xD0, 0x03}, Bytes{0x61, 0x0C});
  EXPECT_TRUE(t.last_was_select);
  EXPECT_FALSE(t.ef_size);
  observe(t, Bytes{0x00, 0xC0, 0x00, 0x00, 0x0C}, ok(fcp(0x0C)));
  EXPECT_EQ(t.ef_size, 0x0Cu);
  // reading the file keeps its size
  observe(t, Bytes{0x00, 0xB0, 0x00, 0x00, 0x0C}, ok(Bytes(12, 0xAA)));
  EXPECT_EQ(t.ef_size, 0x0Cu);
}

TEST(Observe, SelectWithFcpInItsAnswer) {
  CardTrack t;
  observe(t, Bytes{0x00, 0xA4, 0x02, 0x04, 0x02, 0xC0, 0x00}, ok(fcp(0x720)));
  EXPECT_EQ(t.ef_size, 0x720u);
  EXPECT_FALSE(t.last_was_select);
  // a failed SELECT forgets the previous file
  observe(t, Bytes{0x00, 0xA4, 0x02, 0x04, 0x02, 0xC0, 0x09}, Bytes{0x6A, 0x82});
  EXPECT_FALSE(t.ef_size);
}

TEST(Observe, OnlyANonTailReadTeachesTheChunk) {
  CardTrack t;
  observe(t, Bytes{0x00, 0xA4, 0x02, 0x04, 0x02, 0xD0, 0x03}, ok(fcp(0x0C)));
  observe(t, Bytes{0x00, 0xB0, 0x00, 0x00, 0x0C}, ok(Bytes(12, 0)));  // the whole small file
  EXPECT_EQ(t.chunk, 0);
  observe(t, Bytes{0x00, 0xA4, 0x02, 0x04, 0x02, 0xC0, 0x00}, ok(fcp(0x720)));
  observe(t, Bytes{0x00, 0xB0, 0x00, 0x00, 0xE7}, ok(Bytes(0xE7, 0)));
  EXPECT_EQ(t.chunk, 0xE7);
  observe(t, Bytes{0x00, 0xB0, 0x06, 0xD2, 0x4E}, ok(Bytes(0x4E, 0)));  // tail of that file
  EXPECT_EQ(t.chunk, 0xE7);
  // the desk's own speculative reads never teach
  observe(t, Bytes{0x00, 0xB0, 0x00, 0x00, 0x10}, ok(Bytes(0x10, 0)), /*from_program=*/false);
  EXPECT_EQ(t.chunk, 0xE7);
}

}  // namespace
}  // namespace cardbridge::client
