// DeskRuntime: the desk core's threaded edge, over FakeCardApi (an in-memory PC/SC service
// whose blocking calls block like libpcsclite's). What the core decides is tested without
// threads in desk_core_test.cpp; here: calls really run on lane threads, a blocked lane holds
// up only its own context, the reader monitor pushes snapshots, hello retries follow the
// host's timer, failures of the CardApi or the transport stay contained, and shutdown is
// bounded and complete (the Janitor).
//
// Every wait is on an event (a message, a call count in the fake) with a generous deadline
// (kDeadline) as a hang guard; no test asserts that something does not happen within a time.
#include "cardbridge/desk_runtime/desk_runtime.hpp"

#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <set>

#include <gtest/gtest.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/scard.hpp"
#include "fake_card_api.hpp"
#include "cardbridge/desk_runtime/janitor.hpp"

namespace cardbridge::client {
namespace {

namespace pr = cardbridge::protocol;
namespace sc = cardbridge::scard;
using fake::Call;
using fake::FakeCard;
using fake::FakeCardApi;
using namespace std::chrono_literals;
using Messages = std::vector<pr::Message>;

constexpr auto kDeadline = 10s;  // hang guard for what must happen

const std::string kReader1 = "Gemalto PC Twin Reader 00 00";
const std::string kReader2 = "OMNIKEY CardMan 3121 01 00";
const std::string kReader3 = "Lecteur CPS 3 02 00";
const Bytes kAtr1 = {0x3B, 0x7F, 0x96, 0x00, 0x00, 0x80, 0x31, 0x80, 0x65, 0xB0};
const Bytes kAtr2 = {0x3B, 0x02, 0x14, 0x50};
const Bytes kSelect = {0x00, 0xA4, 0x04, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x03, 0x10, 0x10};

FakeCard test_card(Bytes atr) {
  FakeCard c;
  c.atr = std::move(atr);
  c.protocols = sc::kProtocolT0 | sc::kProtocolT1;
  c.answers[kSelect] = {0x90, 0x00};
  return c;
}

pr::Request req(pr::Op op, uint32_t ctx, uint32_t handle = 0) {
  pr::Request q;
  q.op = op;
  q.context = pr::ContextId{ctx};
  q.handle = pr::DeskHandle{handle};
  return q;
}
pr::Request connect_req(uint32_t ctx, const std::string& reader) {
  auto q = req(pr::Op::kConnect, ctx);
  q.reader = reader;
  q.share_mode = sc::kShareShared;
  q.protocols = sc::kProtocolT0 | sc::kProtocolT1;
  return q;
}
pr::Request transmit_req(uint32_t ctx, uint32_t handle) {
  auto q = req(pr::Op::kTransmit, ctx, handle);
  q.protocols = sc::kProtocolT1;
  q.data = kSelect;
  q.recv_length = 258;
  return q;
}

// The transport: every frame the runtime sent (decoded), close reasons, the armed timer.
class FakeHost {
 public:
  DeskRuntime::Io io() {
    DeskRuntime::Io io;
    io.send = [this](std::vector<uint8_t> frame) {
      pr::FrameDecoder d;
      std::optional<pr::Message> m;
      if (d.feed(frame)) {
        if (auto f = d.next()) {
          if (auto decoded = pr::decode(*f)) m = std::move(*decoded);
        }
      }
      std::function<void()> hook;
      {
        std::lock_guard lock(mu_);
        if (m) messages_.push_back(std::move(*m));
        else ++bad_frames_;
        hook = send_hook_;
        cv_.notify_all();
      }
      if (hook) hook();
    };
    io.close_link = [this](const std::string& reason) {
      std::lock_guard lock(mu_);
      closes_.push_back(reason);
      cv_.notify_all();
    };
    io.arm_timer = [this](std::optional<TimePoint> when) {
      std::lock_guard lock(mu_);
      armed_ = when;
      cv_.notify_all();
    };
    return io;
  }
  bool wait(const std::function<bool(const Messages&)>& pred) const {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, kDeadline, [&] { return pred(messages_); });
  }
  Messages messages() const {
    std::lock_guard lock(mu_);
    return messages_;
  }
  std::optional<TimePoint> armed() const {
    std::lock_guard lock(mu_);
    return armed_;
  }
  std::size_t bad_frames() const {
    std::lock_guard lock(mu_);
    return bad_frames_;
  }
  void set_send_hook(std::function<void()> hook) {
    std::lock_guard lock(mu_);
    send_hook_ = std::move(hook);
  }

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  Messages messages_;
  std::vector<std::string> closes_;
  std::optional<TimePoint> armed_;
  std::size_t bad_frames_ = 0;
  std::function<void()> send_hook_;
};

template <typename T>
std::vector<T> bodies(const Messages& ms) {
  std::vector<T> out;
  for (const auto& m : ms) {
    if (auto* b = std::get_if<T>(&m.body)) out.push_back(*b);
  }
  return out;
}

pr::Hello server_hello(uint64_t instance) {
  pr::Hello h = pr::local_hello(pr::Role::kServer, pr::caps::kAll);
  h.peer_name = "session-server-7";
  h.instance = instance;
  return h;
}

class DeskRuntimeTest : public ::testing::Test {
 protected:
  DeskRuntimeTest() {
    api.add_reader(kReader1);
    api.insert_card(kReader1, test_card(kAtr1));
    api.add_reader(kReader2);
    config.desk_name = "desk-042";
    config.capabilities = pr::caps::kAll;
    // What the desk learns for card images is the process's; each test starts from nothing.
    config.images = std::make_shared<ImageStore>();
    config.server_policy.unix_uids = {0};
  }
  ~DeskRuntimeTest() override {
    // Wake whatever still waits in the fake, so that the runtime stops while the fake lives.
    for (std::size_t c = 0; c < fake::kCallCount; ++c) api.release_hold(static_cast<Call>(c));
    rt.reset();
  }

  void make() {
    rt = std::make_unique<DeskRuntime>(api, config, host.io());
    rt->start();
  }
  void hear(const pr::Message& m) { rt->receive(pr::encode_frame(m)); }
  void start_session() {
    make();
    // The monitor has seen the readers: the session's first snapshot describes them.
    ASSERT_TRUE(api.wait_watcher_idle(kDeadline));
    rt->transport_up(PeerIdentity::unix_user(0, 1));
    hear(pr::Message{0, server_hello(0x5E55100)});
    ASSERT_TRUE(host.wait([](const Messages& ms) { return !bodies<pr::ReaderSnapshot>(ms).empty(); }));
  }
  uint32_t submit(pr::Request q) {
    const uint32_t id = next_id_++;
    hear(pr::Message{id, std::move(q)});
    return id;
  }
  std::optional<pr::Reply> wait_reply(uint32_t id) {
    std::optional<pr::Reply> r;
    host.wait([&](const Messages& ms) {
      for (const auto& m : ms) {
        if (auto* rep = std::get_if<pr::Reply>(&m.body); rep && m.id == id) {
          r = *rep;
          return true;
        }
      }
      return false;
    });
    return r;
  }
  pr::Reply call(pr::Request q) {
    auto r = wait_reply(submit(std::move(q)));
    EXPECT_TRUE(r) << "no reply";
    return r.value_or(pr::Reply{});
  }
  std::optional<pr::ReaderSnapshot> wait_snapshot(const std::function<bool(const pr::ReaderSnapshot&)>& pred) {
    std::optional<pr::ReaderSnapshot> found;
    host.wait([&](const Messages& ms) {
      for (const auto& s : bodies<pr::ReaderSnapshot>(ms)) {
        if (pred(s)) {
          found = s;
          return true;
        }
      }
      return false;
    });
    return found;
  }
  static const pr::ReaderInfo* reader_in(const pr::ReaderSnapshot& s, const std::string& name) {
    for (const auto& r : s.readers) {
      if (r.name == name) return &r;
    }
    return nullptr;
  }

  FakeCardApi api;
  DeskConfig config;
  FakeHost host;
  std::unique_ptr<DeskRuntime> rt;  // after the fake and the host: destroyed first
  uint32_t next_id_ = 1;
};

TEST_F(DeskRuntimeTest, CardOperationsRunOnLaneThreadsAndAnswer) {
  start_session();
  auto c = call(connect_req(1, kReader1));
  ASSERT_EQ(c.rv, sc::kSuccess);
  auto t = call(transmit_req(1, c.handle.value));
  EXPECT_EQ(t.rv, sc::kSuccess);
  EXPECT_EQ(t.data, (Bytes{0x90, 0x00}));
  EXPECT_EQ(api.last_command(), kSelect);
  EXPECT_EQ(host.bad_frames(), 0u);
}

TEST_F(DeskRuntimeTest, TheMonitorDescribesEveryReaderAndPushesCardEvents) {
  start_session();
  auto first = bodies<pr::ReaderSnapshot>(host.messages()).back();
  ASSERT_EQ(first.readers.size(), 2u);
  EXPECT_EQ(first.readers[0], (pr::ReaderInfo{kReader1, sc::kStatePresent, 1, kAtr1}));
  EXPECT_EQ(first.readers[1], (pr::ReaderInfo{kReader2, sc::kStateEmpty, 0, {}}));

  api.insert_card(kReader2, test_card(kAtr2));
  auto inserted = wait_snapshot([](const pr::ReaderSnapshot& s) {
    auto* r = reader_in(s, kReader2);
    return r && (r->state & sc::kStatePresent);
  });
  ASSERT_TRUE(inserted) << "no snapshot after the insertion";
  EXPECT_EQ(*reader_in(*inserted, kReader2), (pr::ReaderInfo{kReader2, sc::kStatePresent, 1, kAtr2}));

  api.remove_card(kReader2);
  auto removed = wait_snapshot([](const pr::ReaderSnapshot& s) {
    auto* r = reader_in(s, kReader2);
    return r && r->event_count == 2 && (r->state & sc::kStateEmpty);
  });
  ASSERT_TRUE(removed) << "no snapshot after the removal";
  EXPECT_GT(removed->sequence, inserted->sequence);

  api.add_reader(kReader3);
  ASSERT_TRUE(wait_snapshot([](const pr::ReaderSnapshot& s) { return reader_in(s, kReader3) != nullptr; }))
      << "no snapshot after a reader arrived";
  api.remove_reader(kReader1);
  ASSERT_TRUE(wait_snapshot([](const pr::ReaderSnapshot& s) {
    return reader_in(s, kReader1) == nullptr && reader_in(s, kReader3) != nullptr;
  })) << "no snapshot after a reader left";
}

TEST_F(DeskRuntimeTest, TheReaderFilterHidesReaders) {
  config.policy.reader_filter = {"omnikey"};
  start_session();
  auto snap = bodies<pr::ReaderSnapshot>(host.messages()).back();
  ASSERT_EQ(snap.readers.size(), 1u);
  EXPECT_EQ(snap.readers[0].name, kReader2);
}

TEST_F(DeskRuntimeTest, ALostDeskServiceHidesTheReadersUntilItIsBack) {
  start_session();
  api.set_service_available(false);
  ASSERT_TRUE(wait_snapshot([](const pr::ReaderSnapshot& s) { return s.readers.empty(); }));
  api.set_service_available(true);
  ASSERT_TRUE(wait_snapshot([](const pr::ReaderSnapshot& s) { return s.readers.size() == 2; }));
}

TEST_F(DeskRuntimeTest, ABlockedBeginHoldsUpOnlyItsOwnContext) {
  api.insert_card(kReader2, test_card(kAtr2));
  start_session();
  const uint32_t hb = call(connect_req(2, kReader1)).handle.value;
  const uint32_t ha = call(connect_req(1, kReader1)).handle.value;
  const uint32_t hc = call(connect_req(3, kReader2)).handle.value;
  ASSERT_EQ(call(req(pr::Op::kBeginTransaction, 2, hb)).rv, sc::kSuccess);
  const uint32_t a_begin = submit(req(pr::Op::kBeginTransaction, 1, ha));
  ASSERT_TRUE(api.wait_blocked_in_begin(1, kDeadline)) << "A's Begin did not block behind B's transaction";
  EXPECT_EQ(call(transmit_req(3, hc)).rv, sc::kSuccess) << "context C is not held up";
  EXPECT_EQ(call(req(pr::Op::kEndTransaction, 2, hb)).rv, sc::kSuccess) << "nor is B";
  auto r = wait_reply(a_begin);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->rv, sc::kSuccess);
}

TEST_F(DeskRuntimeTest, HelloRetriesFollowTheHostsTimer) {
  config.hello_retry = 1ms;
  make();
  rt->transport_up(PeerIdentity::unix_user(0, 1));
  auto armed = host.armed();
  ASSERT_TRUE(armed) << "the runtime asks its host for a timer";
  std::this_thread::sleep_until(*armed);  // the host's timer fires at the armed time
  rt->tick();
  ASSERT_TRUE(host.wait([](const Messages& ms) { return bodies<pr::Hello>(ms).size() == 2; }));
  auto hellos = bodies<pr::Hello>(host.messages());
  EXPECT_EQ(hellos[0].instance, hellos[1].instance) << "a retry is the same hello";
  hear(pr::Message{0, server_hello(7)});
  EXPECT_FALSE(host.armed()) << "no timer once the server answered";
}

TEST_F(DeskRuntimeTest, AnExceptionFromTheCardApiBecomesAnInternalError) {
  start_session();
  const uint32_t h = call(connect_req(1, kReader1)).handle.value;
  api.throw_once(Call::kTransmit);
  EXPECT_EQ(call(transmit_req(1, h)).rv, sc::kFInternalError);
  api.throw_once(Call::kTransmit, fake::Throw::kNonStd);
  EXPECT_EQ(call(transmit_req(1, h)).rv, sc::kFInternalError);
  EXPECT_EQ(call(transmit_req(1, h)).rv, sc::kSuccess) << "the lane goes on";
}

TEST_F(DeskRuntimeTest, ATransportThatThrowsLosesItsFrameButNotTheRuntime) {
  start_session();
  const uint32_t h = call(connect_req(1, kReader1)).handle.value;
  auto throws = std::make_shared<std::atomic<int>>(1);  // outlives the test body: the runtime may send later
  host.set_send_hook([throws] {
    if (throws->fetch_sub(1) > 0) throw std::runtime_error("socket gone");
  });
  submit(transmit_req(1, h));  // its reply is lost in the throwing transport
  EXPECT_EQ(call(transmit_req(1, h)).rv, sc::kSuccess);
}

TEST_F(DeskRuntimeTest, TheMonitorSurvivesAnExceptionFromTheCardApi) {
  start_session();
  api.throw_once(Call::kGetStatusChange);
  api.insert_card(kReader2, test_card(kAtr2));
  ASSERT_TRUE(wait_snapshot([](const pr::ReaderSnapshot& s) {
    auto* r = reader_in(s, kReader2);
    return r && (r->state & sc::kStatePresent);
  })) << "the monitor did not come back";
}

// ---- shutdown ----------------------------------------------------------------------------

TEST_F(DeskRuntimeTest, StopReleasesEveryContextAndIsIdempotent) {
  start_session();
  call(connect_req(1, kReader1));
  call(connect_req(2, kReader1));
  EXPECT_TRUE(rt->stop());
  EXPECT_TRUE(rt->finished());
  EXPECT_EQ(api.live_worker_contexts(), 0u);
  EXPECT_TRUE(rt->stop());
  const auto before = host.messages().size();
  hear(pr::Message{99, req(pr::Op::kEstablishContext, 5)});
  EXPECT_EQ(host.messages().size(), before) << "nothing is served after stop";
}

TEST_F(DeskRuntimeTest, StopIsBoundedWhileALaneIsStuckAndTheRuntimeFinishesLater) {
  start_session();
  const uint32_t h = call(connect_req(1, kReader1)).handle.value;
  api.hold(Call::kTransmit);  // the call stays inside the PC/SC service
  submit(transmit_req(1, h));
  ASSERT_TRUE(api.wait_held(Call::kTransmit, 1, kDeadline));
  EXPECT_FALSE(rt->stop(50ms)) << "the stuck call is reported";
  EXPECT_FALSE(rt->finished());
  api.release_hold(Call::kTransmit);
  ASSERT_TRUE(api.wait_live_worker_contexts(0, kDeadline)) << "the context is released once the call returns";
  rt.reset();  // joins every thread
}

TEST_F(DeskRuntimeTest, TheJanitorDisposesOfARuntimeWhoseCallIsStuck) {
  start_session();
  const uint32_t h = call(connect_req(1, kReader1)).handle.value;
  api.hold(Call::kTransmit);
  submit(transmit_req(1, h));
  ASSERT_TRUE(api.wait_held(Call::kTransmit, 1, kDeadline));
  rt->detach_io();
  Janitor::instance().dispose(std::move(rt));
  EXPECT_FALSE(Janitor::instance().drain(100ms)) << "the call is still stuck";
  api.release_hold(Call::kTransmit);
  EXPECT_TRUE(Janitor::instance().drain(kDeadline));
  EXPECT_EQ(api.live_worker_contexts(), 0u);
}

}  // namespace
}  // namespace cardbridge::client
