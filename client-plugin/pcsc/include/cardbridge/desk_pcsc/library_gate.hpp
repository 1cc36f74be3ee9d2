// LibraryGate: makes one process's concurrent use of libpcsclite safe.
//
// libpcsclite (1.9.9, and every version with the same client code) keeps one process-wide
// table: a list of contexts, each with a list of its card handles. Every call on a card
// handle first searches all of those lists, holding only the library's global mutex.
// SCardConnect appends to its context's list and SCardDisconnect deletes from it holding
// only that context's mutex. So a Connect or Disconnect on one context, concurrent with
// any handle call on another context, can make the search follow a freed list element:
// the process crashes (seen here in cardbridge-desk and in multi-threaded pyscard clients,
// on the desk's own pcscd as well as through the shim). The desk runs one thread per
// server context, so it must keep those two apart itself.
//
// Worse, SCardDisconnect's removal searches every context holding no library mutex at all,
// so it also races with SCardEstablishContext and SCardReleaseContext (which add and free
// contexts under the global mutex). Those two crashes are the ones seen.
//
// The gate is a readers-writer lock with one more rule:
//  * a call that looks a handle up (Transmit, Status, Begin, ...) runs shared;
//  * Connect, Disconnect, EstablishContext and ReleaseContext run exclusive, i.e. never
//    during a handle look-up nor during each other;
//  * readers never wait for a waiting writer (a transaction holder's End must get through
//    while a Connect waits), so an exclusive section can only wait for calls in flight;
//  * pcscd makes Connect, Disconnect with a card action, and ReleaseContext of a context
//    with handles (it disconnects them with a reset) wait while another handle
//    holds a transaction on the reader. If that handle is one of ours, its End could not
//    run during our exclusive section: so the gate tracks our transactions per reader and
//    does that waiting itself, outside any section. Equally, BeginTransaction waits here
//    (not in libpcsclite's retry loop, which would hold a shared section) while another
//    of our handles holds or is taking the reader's transaction.
// What is left for pcscd to wait on inside a section is other programs at the desk.
// pcscd drops a reader's transaction when its card is removed: each transaction we track
// carries the reader's event counter when it began (SCardStatus right after the Begin),
// and the desk's reader monitor reports every counter it sees (observe()): a transaction
// begun under another counter is gone.
//
// Pure logic (no libpcsclite): the calls are passed in; unit-tested with plain functions.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>

namespace cardbridge::client {

class LibraryGate {
 public:
  using Context = int64_t;
  using Handle = int64_t;

  // A call that looks |card| up (Transmit, Status, Control, Get/SetAttrib, Reconnect, End).
  // An answer saying the handle or its reader is gone drops what the gate knew of it.
  template <typename F>
  uint32_t lookup(Handle card, F&& call) {
    enter_shared();
    const uint32_t rv = call();
    leave_shared(card, rv, Change::kNone);
    return rv;
  }
  template <typename F>
  uint32_t end_transaction(Handle card, F&& call) {
    enter_shared();
    const uint32_t rv = call();
    leave_shared(card, rv, Change::kEnd);
    return rv;
  }
  // Waits while another of our handles holds (or is taking) |card|'s reader transaction.
  // |counter| runs after a successful Begin, in the same section: the reader's event
  // counter (pcsc-lite's dwState >> 16), kGone when the card went meanwhile (no lock is
  // left), or kUnknown.
  static constexpr int64_t kGone = -1;
  static constexpr int64_t kUnknown = -2;
  template <typename F, typename Counter>
  uint32_t begin_transaction(Handle card, F&& call, Counter&& counter) {
    const bool tracked = enter_begin(card);
    const uint32_t rv = call();
    const int64_t epoch = rv == 0 && tracked ? counter() : kUnknown;
    leave_begin(card, rv, tracked, epoch);
    return rv;
  }
  // The reader monitor saw |reader| with event counter |counter|.
  void observe(const std::string& reader, uint32_t counter);
  // |call| is uint32_t(Handle* out). Waits while one of our handles holds or is taking a
  // transaction on |reader|, then runs exclusive; a handle it makes is tracked.
  template <typename F>
  uint32_t connect(Context ctx, const std::string& reader, F&& call) {
    enter_exclusive([&] { return reader_locked(reader, [](Handle) { return false; }); });
    Handle made = 0;
    const uint32_t rv = call(&made);
    leave_connect(ctx, reader, rv, made);
    return rv;
  }
  // With a card action (|leave| false) waits like Connect, except for |card|'s own lock.
  template <typename F>
  uint32_t disconnect(Handle card, bool leave, F&& call) {
    const std::string reader = reader_of(card);
    enter_exclusive([&] { return !leave && reader_locked(reader, [&](Handle h) { return h == card; }); });
    const uint32_t rv = call();
    leave_disconnect(card, rv);
    return rv;
  }
  template <typename F>
  uint32_t establish(F&& call) {
    enter_exclusive([] { return false; });
    const uint32_t rv = call();
    leave_exclusive();
    return rv;
  }
  // pcscd disconnects the context's handles with a reset (unless the card was reset or
  // removed meanwhile), waiting for other handles' transactions on their readers.
  template <typename F>
  uint32_t release(Context ctx, F&& call) {
    enter_exclusive([&] { return context_blocked(ctx); });
    const uint32_t rv = call();
    leave_release(ctx);
    return rv;
  }

  // For tests and logs.
  std::size_t tracked_handles() const;
  int transactions(Handle card) const;

 private:
  enum class Change { kNone, kEnd };
  struct Entry {
    Context ctx = 0;
    std::string reader;
    int transactions = 0;       // successful Begins not yet ended
    int64_t epoch = kUnknown;   // the reader's event counter when the first one began
    bool beginning = false;     // a Begin is in flight
  };

  void enter_shared();
  bool enter_begin(Handle card);
  void leave_shared(Handle card, uint32_t rv, Change change);
  void leave_begin(Handle card, uint32_t rv, bool tracked, int64_t epoch);
  // Waits until no section is open and |blocked| (evaluated under m_) is false.
  template <typename Blocked>
  void enter_exclusive(Blocked blocked) {
    std::unique_lock lock(m_);
    cv_.wait(lock, [&] { return !writer_ && readers_ == 0 && !blocked(); });
    writer_ = true;
  }
  void leave_exclusive();
  void leave_connect(Context ctx, const std::string& reader, uint32_t rv, Handle made);
  void leave_disconnect(Handle card, uint32_t rv);
  void leave_release(Context ctx);
  std::string reader_of(Handle card) const;
  // One of our handles, other than those |excluded|, holds or is taking a transaction on
  // |reader|. Called under m_.
  template <typename Excluded>
  bool reader_locked(const std::string& reader, Excluded excluded) const {
    for (const auto& [h, e] : handles_) {
      if (!excluded(h) && e.reader == reader && (e.transactions > 0 || e.beginning)) return true;
    }
    return false;
  }
  // A reader |ctx| has a handle on is locked by a handle of another context.
  bool context_blocked(Context ctx) const;

  mutable std::mutex m_;
  std::condition_variable cv_;
  int readers_ = 0;
  bool writer_ = false;
  std::map<Handle, Entry> handles_;
};

}  // namespace cardbridge::client
