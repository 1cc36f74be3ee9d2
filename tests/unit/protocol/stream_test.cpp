// transport::ByteStream over a real socket pair: the handlers given to start() are released
// when the stream closes, whichever way it closes (close() by its owner, from inside a
// handler or not; close_after_flush(); the peer hanging up). Owners put themselves in those
// handlers (the control socket's connection, the agent's server connection), so a handler
// kept after close() is the owner, the stream and its 64 KiB read buffer kept for ever.
#include "cardbridge/transport/stream.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace cardbridge::transport {
namespace {

namespace asio = boost::asio;

struct Owner {
  std::shared_ptr<ByteStream> stream;
  std::vector<std::string> closes;
  std::string received;
};

class ByteStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int fds[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
    peer_ = fds[1];
    GenericSocket s(io_);
    s.assign(asio::generic::stream_protocol(AF_UNIX, 0), fds[0]);
    auto owner = std::make_shared<Owner>();
    owner->stream = std::make_shared<ByteStream>(std::move(s));
    watch_ = owner;
    stream_ = owner->stream;
    // The owner's usual cycle: the stream holds handlers that hold the owner, which holds
    // the stream.
    owner->stream->start([owner](std::span<const uint8_t> d) { owner->received.append(d.begin(), d.end()); },
                         [owner](const std::string& why) { owner->closes.push_back(why); });
  }
  void TearDown() override {
    if (peer_ >= 0) ::close(peer_);
  }
  // Runs the io_context until nothing is left to do (handlers posted by close() included).
  void drain() {
    io_.restart();
    io_.run();
  }
  void peer_write(const std::string& s) { ASSERT_EQ(::write(peer_, s.data(), s.size()), static_cast<ssize_t>(s.size())); }

  asio::io_context io_;
  int peer_ = -1;
  std::weak_ptr<Owner> watch_;
  std::weak_ptr<ByteStream> stream_;
};

TEST_F(ByteStreamTest, TheCycleIsAliveWhileTheStreamIsOpen) {
  peer_write("abc");
  io_.run_one();  // the read completes
  ASSERT_FALSE(watch_.expired());
  EXPECT_EQ(watch_.lock()->received, "abc");
  EXPECT_FALSE(stream_.expired());
}

TEST_F(ByteStreamTest, CloseReleasesTheHandlersAndWithThemTheOwner) {
  watch_.lock()->stream->close("the owner's decision");
  drain();
  EXPECT_TRUE(watch_.expired()) << "the handlers kept their owner after close()";
  EXPECT_TRUE(stream_.expired()) << "the stream outlived its owner";
}

TEST_F(ByteStreamTest, CloseFromInsideTheDataHandlerIsSafeAndReleases) {
  // Replace the handlers: the data handler closes the stream it is called from (the control
  // socket does this for an oversized request).
  auto owner = watch_.lock();
  auto stream = owner->stream;
  owner.reset();
  // A second stream on a fresh pair, whose data handler closes its own stream.
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  GenericSocket s(io_);
  s.assign(asio::generic::stream_protocol(AF_UNIX, 0), fds[0]);
  auto o2 = std::make_shared<Owner>();
  o2->stream = std::make_shared<ByteStream>(std::move(s));
  std::weak_ptr<Owner> w2 = o2;
  std::weak_ptr<ByteStream> ws2 = o2->stream;
  int calls = 0;
  o2->stream->start(
      [o2, &calls](std::span<const uint8_t>) {
        ++calls;
        o2->stream->close("request too large");
        // Still inside the handler: its captures must still be alive here.
        EXPECT_TRUE(o2->stream);
      },
      [o2](const std::string& why) { o2->closes.push_back(why); });
  o2.reset();
  ASSERT_EQ(::write(fds[1], "x", 1), 1);
  stream->close();
  stream.reset();
  drain();
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(w2.expired()) << "closing from inside the data handler kept the owner";
  EXPECT_TRUE(ws2.expired());
  ::close(fds[1]);
}

TEST_F(ByteStreamTest, CloseAfterFlushWritesThenReleases) {
  auto owner = watch_.lock();
  owner->stream->send({'o', 'k', '\n'});
  owner->stream->close_after_flush("answered");
  owner.reset();
  drain();
  char buf[8] = {};
  ASSERT_EQ(::read(peer_, buf, sizeof buf), 3);
  EXPECT_EQ(std::string(buf, 3), "ok\n");
  EXPECT_EQ(::read(peer_, buf, sizeof buf), 0) << "the stream is closed once flushed";
  EXPECT_TRUE(watch_.expired()) << "the handlers kept their owner after close_after_flush()";
}

TEST_F(ByteStreamTest, PeerHangUpRunsTheCloseHandlerOnceThenReleasesBoth) {
  ::close(peer_);
  peer_ = -1;
  // Observe the close handler's run through a copy of the owner taken before.
  auto owner = watch_.lock();
  std::weak_ptr<Owner> w = owner;
  std::vector<std::string>* closes = &owner->closes;
  owner.reset();
  // The owner lives on only in the handlers: keep a raw look at its closes through the
  // handler run (the handler runs before the release).
  std::size_t seen = 0;
  io_.restart();
  while (io_.run_one()) {
    if (!w.expired()) seen = closes->size();
  }
  EXPECT_EQ(seen, 1u) << "the close handler ran once";
  EXPECT_TRUE(w.expired()) << "the handlers kept their owner after the peer closed";
  EXPECT_TRUE(stream_.expired());
}

}  // namespace
}  // namespace cardbridge::transport
