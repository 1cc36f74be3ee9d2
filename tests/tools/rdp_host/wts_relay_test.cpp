// WtsRelay against a fake WTS channel: WinPR dispatches WTSVirtualChannelRead/Write/Query
// through a function table, so a table of our own stands in for FreeRDP's server channels
// (same semantics: whole messages, a null buffer peeks at the size, an empty queue fails with
// ERROR_NO_DATA, a dynamic channel closed by the client leaves a quit message at the head of
// its queue and reports itself not ready). The shim is a plain UNIX socket.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <winpr/synch.h>
#include <winpr/wtsapi.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cardbridge/wts_relay/wts_relay.hpp"

namespace {

using cardbridge::shim::WtsRelay;
using namespace std::chrono_literals;
using Bytes = std::vector<uint8_t>;

// ---- fake channel ---------------------------------------------------------------------------

struct FakeChannel {
  explicit FakeChannel(bool dynamic_channel) : dynamic(dynamic_channel) {
    event = CreateEventA(nullptr, TRUE, FALSE, nullptr);
  }
  ~FakeChannel() { CloseHandle(event); }

  // Client -> server message.
  void push(Bytes m) {
    std::lock_guard lock(mu);
    inbound.push_back(std::move(m));
    SetEvent(event);
  }
  // The client closes the dynamic channel.
  void close_by_client() {
    std::lock_guard lock(mu);
    closed = true;
    quit = true;
    SetEvent(event);
  }
  std::size_t pending() {
    std::lock_guard lock(mu);
    return inbound.size();
  }
  Bytes written_bytes() {
    std::lock_guard lock(mu);
    return written;
  }
  std::vector<std::size_t> write_sizes() {
    std::lock_guard lock(mu);
    return writes;
  }

  const bool dynamic;
  HANDLE event = nullptr;
  std::mutex mu;
  std::deque<Bytes> inbound;
  std::size_t offset = 0;
  bool quit = false;
  bool closed = false;
  Bytes written;
  std::vector<std::size_t> writes;
  std::atomic<int> calls_after_release{0};
  std::atomic<bool> released{false};
};

FakeChannel* fake(HANDLE h) {
  auto* c = static_cast<FakeChannel*>(h);
  if (c->released) ++c->calls_after_release;
  return c;
}

BOOL WINAPI fake_read(HANDLE h, ULONG, PCHAR buf, ULONG size, PULONG got) {
  auto* c = fake(h);
  std::lock_guard lock(c->mu);
  if (c->inbound.empty()) {
    if (c->quit) return FALSE;  // quit message: no data, no error code
    SetLastError(ERROR_NO_DATA);
    *got = 0;
    return FALSE;
  }
  Bytes& m = c->inbound.front();
  *got = static_cast<ULONG>(m.size() - c->offset);
  if (!buf || size == 0) return TRUE;
  if (*got > size) *got = size;
  std::memcpy(buf, m.data() + c->offset, *got);
  c->offset += *got;
  if (c->offset >= m.size()) {
    c->inbound.pop_front();
    c->offset = 0;
    if (c->inbound.empty() && !c->quit) ResetEvent(c->event);
  }
  return TRUE;
}

BOOL WINAPI fake_write(HANDLE h, PCHAR buf, ULONG len, PULONG written) {
  auto* c = fake(h);
  std::lock_guard lock(c->mu);
  if (c->closed) return FALSE;
  c->written.insert(c->written.end(), buf, buf + len);
  c->writes.push_back(len);
  if (written) *written = len;
  return TRUE;
}

BOOL WINAPI fake_query(HANDLE h, WTS_VIRTUAL_CLASS what, PVOID* out, DWORD* out_len) {
  auto* c = fake(h);
  std::lock_guard lock(c->mu);
  if (what == WTSVirtualEventHandle) {
    *out = std::malloc(sizeof(HANDLE));
    std::memcpy(*out, &c->event, sizeof(HANDLE));
    *out_len = sizeof(HANDLE);
    return TRUE;
  }
  if (what == WTSVirtualChannelReady) {
    BOOL ready = c->closed ? FALSE : TRUE;
    *out = std::malloc(sizeof(BOOL));
    std::memcpy(*out, &ready, sizeof ready);
    *out_len = sizeof(BOOL);
    return c->closed ? FALSE : TRUE;
  }
  return FALSE;
}

VOID WINAPI fake_free(PVOID p) { std::free(p); }

WtsApiFunctionTable g_table{};

class Environment : public ::testing::Environment {
 public:
  void SetUp() override {
    g_table.pVirtualChannelRead = fake_read;
    g_table.pVirtualChannelWrite = fake_write;
    g_table.pVirtualChannelQuery = fake_query;
    g_table.pFreeMemory = fake_free;
    WTSRegisterWtsApiFunctionTable(&g_table);
  }
};
[[maybe_unused]] auto* const g_env = ::testing::AddGlobalTestEnvironment(new Environment);

// ---- helpers ----------------------------------------------------------------------------------

Bytes frame(std::size_t payload, uint8_t seed) {
  Bytes f(4 + payload);
  f[0] = static_cast<uint8_t>(payload >> 24);
  f[1] = static_cast<uint8_t>(payload >> 16);
  f[2] = static_cast<uint8_t>(payload >> 8);
  f[3] = static_cast<uint8_t>(payload);
  for (std::size_t i = 0; i < payload; ++i) f[4 + i] = static_cast<uint8_t>(seed + i * 7);
  return f;
}

template <typename F>
bool eventually(F pred, std::chrono::milliseconds limit = 3000ms) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(2ms);
  }
  return pred();
}

class Shim {
 public:
  explicit Shim(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  }
  ~Shim() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool connected() const { return connected_; }
  void send(const Bytes& b) { ASSERT_EQ(::send(fd_, b.data(), b.size(), MSG_NOSIGNAL), static_cast<ssize_t>(b.size())); }
  // Reads exactly n bytes (or fails the test).
  Bytes read(std::size_t n, std::chrono::milliseconds limit = 3000ms) {
    Bytes out;
    const auto end = std::chrono::steady_clock::now() + limit;
    while (out.size() < n && std::chrono::steady_clock::now() < end) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 10) <= 0) continue;
      uint8_t buf[65536];
      ssize_t r = ::recv(fd_, buf, std::min(sizeof buf, n - out.size()), 0);
      if (r <= 0) break;
      out.insert(out.end(), buf, buf + r);
    }
    return out;
  }
  // True once the relay has closed the connection (EOF or reset), draining what is left.
  bool closed_by_relay(std::chrono::milliseconds limit = 3000ms) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 10) <= 0) continue;
      uint8_t buf[65536];
      ssize_t r = ::recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
      if (r == 0 || (r < 0 && errno != EAGAIN)) return true;
    }
    return false;
  }
  // Nothing arrives and the connection stays open for |d|.
  bool quiet_for(std::chrono::milliseconds d) {
    pollfd p{fd_, POLLIN, 0};
    return ::poll(&p, 1, static_cast<int>(d.count())) == 0;
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
};

class WtsRelayTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cbrelay-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/rt/relay.sock";
  }
  void TearDown() override {
    relay_.reset();
    std::filesystem::remove_all(dir_);
  }
  void start(WtsRelay::Options o = {}) {
    o.socket_path = path_;
    auto r = WtsRelay::start(std::move(o));
    ASSERT_TRUE(r.ok()) << r.error();
    relay_ = std::move(*r);
  }
  std::unique_ptr<Shim> connect_shim() {
    const auto before = relay_->stats().shim_connections;
    auto s = std::make_unique<Shim>(path_);
    EXPECT_TRUE(s->connected());
    EXPECT_TRUE(eventually([&] { return relay_->stats().shim_connected && relay_->stats().shim_connections > before; }));
    return s;
  }
  void wait_connections(std::uint64_t n) {
    ASSERT_TRUE(eventually([&] { return relay_->stats().shim_connections >= n && relay_->stats().shim_connected; }));
  }

  std::string dir_;
  std::string path_;
  std::unique_ptr<WtsRelay> relay_;
};

// ---- tests ------------------------------------------------------------------------------------

TEST_F(WtsRelayTest, SocketIsPrivateAndStaleSocketIsReplaced) {
  std::filesystem::create_directories(dir_ + "/rt");
  ::chmod((dir_ + "/rt").c_str(), 0700);
  {  // a stale socket file: bound, then abandoned
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path_.c_str(), sizeof a.sun_path - 1);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    ::close(fd);
  }
  start();
  struct stat st {};
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(::stat((dir_ + "/rt").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);

  // A second relay on the same live socket is refused.
  WtsRelay::Options o;
  o.socket_path = path_;
  auto second = WtsRelay::start(o);
  ASSERT_FALSE(second.ok());
  EXPECT_NE(second.error().find("in use"), std::string::npos) << second.error();

  relay_.reset();
  EXPECT_FALSE(std::filesystem::exists(path_)) << "socket left behind";
}

TEST_F(WtsRelayTest, RefusesADirectoryOthersCanWrite) {
  std::filesystem::create_directories(dir_ + "/rt");
  ::chmod((dir_ + "/rt").c_str(), 0777);
  WtsRelay::Options o;
  o.socket_path = path_;
  auto r = WtsRelay::start(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().find("writable by others"), std::string::npos) << r.error();
}

TEST_F(WtsRelayTest, BytesFlowBothWaysUnchanged) {
  start();
  FakeChannel ch(false);
  auto id = relay_->attach_channel(&ch, WtsRelay::ChannelKind::kStatic, "test");
  EXPECT_NE(id, 0u);
  auto shim = connect_shim();

  // Channel -> shim: messages as they come, byte for byte.
  Bytes expect;
  for (int i = 0; i < 20; ++i) {
    Bytes m = frame(static_cast<std::size_t>(1 + i * 997), static_cast<uint8_t>(i));
    expect.insert(expect.end(), m.begin(), m.end());
    ch.push(m);
  }
  EXPECT_EQ(shim->read(expect.size()), expect);

  // Shim -> channel: written in awkward pieces, arrives whole and in order.
  Bytes stream;
  for (int i = 0; i < 10; ++i) {
    Bytes f = frame(static_cast<std::size_t>(100 + i * 5000), static_cast<uint8_t>(40 + i));
    stream.insert(stream.end(), f.begin(), f.end());
  }
  for (std::size_t pos = 0; pos < stream.size();) {
    const std::size_t n = std::min<std::size_t>(stream.size() - pos, 1 + (pos % 1601));
    shim->send(Bytes(stream.begin() + static_cast<std::ptrdiff_t>(pos), stream.begin() + static_cast<std::ptrdiff_t>(pos + n)));
    pos += n;
  }
  ASSERT_TRUE(eventually([&] { return ch.written_bytes().size() == stream.size(); }));
  EXPECT_EQ(ch.written_bytes(), stream);
  auto st = relay_->stats();
  EXPECT_EQ(st.bytes_to_channel, stream.size());
  EXPECT_EQ(st.bytes_to_shim, expect.size());
  relay_->detach_channel(id, "test over");
}

TEST_F(WtsRelayTest, ShimReplacedMidFrameNeverDesynchronisesTheChannel) {
  start();
  FakeChannel ch(false);
  auto id = relay_->attach_channel(&ch, WtsRelay::ChannelKind::kStatic, "test");
  auto first = connect_shim();
  Bytes f = frame(1000, 1);
  first->send(Bytes(f.begin(), f.begin() + 500));  // half a frame, then a new shim connects
  std::this_thread::sleep_for(50ms);
  EXPECT_TRUE(ch.written_bytes().empty()) << "a partial frame reached the channel";
  Shim second(path_);
  ASSERT_TRUE(second.connected());
  wait_connections(2);
  EXPECT_TRUE(first->closed_by_relay()) << "the replaced connection stays open";
  Bytes g = frame(10, 9);
  second.send(g);
  ASSERT_TRUE(eventually([&] { return ch.written_bytes().size() == g.size(); }));
  EXPECT_EQ(ch.written_bytes(), g);
  relay_->detach_channel(id, "test over");
}

TEST_F(WtsRelayTest, WithoutAChannelTheShimStaysConnectedAndItsBytesAreDropped) {
  start();
  auto shim = connect_shim();
  shim->send(frame(100, 3));
  shim->send(Bytes{0, 0, 0, 50, 1, 2});  // start of a frame, completed after the attach
  ASSERT_TRUE(eventually([&] { return relay_->stats().dropped_to_channel == 104; }));
  EXPECT_TRUE(shim->quiet_for(100ms));

  FakeChannel ch(true);
  auto id = relay_->attach_channel(&ch, WtsRelay::ChannelKind::kDynamic, "late");
  shim->send(Bytes(48, 7));  // completes the 50-byte frame
  Bytes h = frame(5, 5);
  shim->send(h);
  ASSERT_TRUE(eventually([&] { return ch.written_bytes().size() == 54 + h.size(); }));
  Bytes expect{0, 0, 0, 50, 1, 2};
  expect.insert(expect.end(), 48, 7);
  expect.insert(expect.end(), h.begin(), h.end());
  EXPECT_EQ(ch.written_bytes(), expect);
  ch.push(Bytes{9, 9, 9});
  EXPECT_EQ(shim->read(3), (Bytes{9, 9, 9}));
  relay_->detach_channel(id, "test over");
}

TEST_F(WtsRelayTest, ChannelGoingAwayClosesTheShimConnectionAndTheNextChannelServesTheNextOne) {
  start();
  FakeChannel a(false);
  auto ida = relay_->attach_channel(&a, WtsRelay::ChannelKind::kStatic, "desk-a");
  auto shim = connect_shim();
  a.push(Bytes{1});
  EXPECT_EQ(shim->read(1), Bytes{1});

  relay_->detach_channel(ida, "client disconnected");
  a.released = true;  // from here on the relay must not touch channel a
  EXPECT_TRUE(shim->closed_by_relay());
  EXPECT_EQ(relay_->stats().attached, 0u);

  Shim again(path_);  // the shim reconnects while no channel is up
  ASSERT_TRUE(again.connected());
  wait_connections(2);
  FakeChannel b(true);
  auto idb = relay_->attach_channel(&b, WtsRelay::ChannelKind::kDynamic, "desk-b");
  b.push(Bytes{2, 3});
  EXPECT_EQ(again.read(2), (Bytes{2, 3}));
  relay_->detach_channel(ida, "stale id: no-op");  // must not disturb b
  b.push(Bytes{4});
  EXPECT_EQ(again.read(1), Bytes{4});
  EXPECT_EQ(a.calls_after_release.load(), 0);
  relay_->detach_channel(idb, "test over");
}

TEST_F(WtsRelayTest, AttachReplacesTheChannelAndReleasesTheOldOneBeforeReturning) {
  start();
  FakeChannel a(false), b(false);
  relay_->attach_channel(&a, WtsRelay::ChannelKind::kStatic, "desk-a");
  auto shim = connect_shim();
  auto idb = relay_->attach_channel(&b, WtsRelay::ChannelKind::kStatic, "desk-b");
  a.released = true;
  a.push(Bytes{1, 2, 3});  // the old channel is not read any more
  EXPECT_TRUE(shim->closed_by_relay()) << "the shim connection of the old channel stays open";
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(a.calls_after_release.load(), 0);
  EXPECT_EQ(a.pending(), 1u);
  EXPECT_EQ(relay_->stats().attached, idb);
  relay_->detach_channel(idb, "test over");
}

TEST_F(WtsRelayTest, ASlowShimIsDroppedAndTheChannelIsNeverBlocked) {
  WtsRelay::Options o;
  o.max_queued_bytes = 256 * 1024;
  o.stall_timeout = 60s;  // only the queue limit here
  start(o);
  FakeChannel ch(false);
  auto id = relay_->attach_channel(&ch, WtsRelay::ChannelKind::kStatic, "flood");
  auto shim = connect_shim();  // never reads
  for (int i = 0; i < 128; ++i) ch.push(Bytes(64 * 1024, static_cast<uint8_t>(i)));  // 8 MiB
  ASSERT_TRUE(eventually([&] { return ch.pending() == 0; })) << "the relay stopped reading the channel";
  EXPECT_TRUE(eventually([&] { return relay_->stats().shim_drops == 1; }));
  EXPECT_FALSE(relay_->stats().shim_connected);
  EXPECT_GT(relay_->stats().dropped_to_shim, 0u);
  EXPECT_TRUE(shim->closed_by_relay());
  relay_->detach_channel(id, "test over");
}

TEST_F(WtsRelayTest, AShimThatStopsReadingIsDroppedAfterTheStallTimeout) {
  WtsRelay::Options o;
  o.max_queued_bytes = 64 * 1024 * 1024;
  o.stall_timeout = 300ms;
  start(o);
  FakeChannel ch(false);
  auto id = relay_->attach_channel(&ch, WtsRelay::ChannelKind::kStatic, "stall");
  auto shim = connect_shim();
  for (int i = 0; i < 64; ++i) ch.push(Bytes(64 * 1024, 1));  // 4 MiB: more than the socket holds
  ASSERT_TRUE(eventually([&] { return ch.pending() == 0; }));
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(eventually([&] { return relay_->stats().shim_drops == 1; }, 3000ms));
  const auto waited = std::chrono::steady_clock::now() - t0;
  EXPECT_LT(waited, 2000ms);
  relay_->detach_channel(id, "test over");
}

TEST_F(WtsRelayTest, DynamicChannelClosedByTheClientIsReportedAndClosesTheShim) {
  std::atomic<WtsRelay::AttachmentId> lost{0};
  WtsRelay::Options o;
  o.on_channel_lost = [&](WtsRelay::AttachmentId id, const std::string&) { lost = id; };
  start(o);
  FakeChannel ch(true);
  auto id = relay_->attach_channel(&ch, WtsRelay::ChannelKind::kDynamic, "dvc");
  auto shim = connect_shim();
  ch.push(Bytes{5});
  EXPECT_EQ(shim->read(1), Bytes{5});
  ch.close_by_client();
  EXPECT_TRUE(eventually([&] { return lost.load() == id; }));
  EXPECT_TRUE(shim->closed_by_relay());
  // A new shim connection is accepted and kept; its bytes go nowhere.
  auto again = connect_shim();
  again->send(frame(3, 3));
  EXPECT_TRUE(eventually([&] { return relay_->stats().dropped_to_channel >= 7; }));
  EXPECT_TRUE(ch.written_bytes().empty());
  relay_->detach_channel(id, "test over");
}

TEST_F(WtsRelayTest, AnOversizedOrEmptyFrameFromTheShimDropsItsConnection) {
  start();
  FakeChannel ch(false);
  auto id = relay_->attach_channel(&ch, WtsRelay::ChannelKind::kStatic, "test");
  auto bad = connect_shim();
  bad->send(Bytes{0x7F, 0, 0, 0});
  EXPECT_TRUE(bad->closed_by_relay());
  auto empty = connect_shim();
  empty->send(Bytes{0, 0, 0, 0});
  EXPECT_TRUE(empty->closed_by_relay());
  EXPECT_TRUE(ch.written_bytes().empty());
  EXPECT_EQ(relay_->stats().shim_drops, 2u);
  relay_->detach_channel(id, "test over");
}

TEST_F(WtsRelayTest, DetachFromManyThreadsWhileTrafficFlows) {
  start();
  auto shim = connect_shim();
  for (int round = 0; round < 50; ++round) {
    FakeChannel ch(round % 2 == 1);
    auto id = relay_->attach_channel(&ch, round % 2 ? WtsRelay::ChannelKind::kDynamic : WtsRelay::ChannelKind::kStatic,
                                     "round");
    std::thread pusher([&] {
      for (int i = 0; i < 20; ++i) ch.push(Bytes(100, 1));
    });
    std::thread detacher([&] { relay_->detach_channel(id, "round over"); });
    pusher.join();
    detacher.join();
    ch.released = true;
    std::this_thread::sleep_for(1ms);
    EXPECT_EQ(ch.calls_after_release.load(), 0) << "round " << round;
  }
}

}  // namespace
