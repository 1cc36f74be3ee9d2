#include "cardbridge/desk_pcsc/library_gate.hpp"

#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {

namespace sc = cardbridge::scard;

namespace {

// Answers after which pcscd no longer knows the handle (or its reader): no lock remains.
bool handle_gone(uint32_t rv) { return rv == sc::kEInvalidHandle || rv == sc::kEReaderUnavailable; }

}  // namespace

void LibraryGate::enter_shared() {
  std::unique_lock lock(m_);
  cv_.wait(lock, [&] { return !writer_; });
  ++readers_;
}

bool LibraryGate::enter_begin(Handle card) {
  std::unique_lock lock(m_);
  auto it = handles_.find(card);
  if (it == handles_.end()) {  // unknown to us: libpcsclite answers INVALID_HANDLE
    cv_.wait(lock, [&] { return !writer_; });
    ++readers_;
    return false;
  }
  const std::string reader = it->second.reader;
  cv_.wait(lock, [&] { return !writer_ && !reader_locked(reader, [&](Handle h) { return h == card; }); });
  ++readers_;
  it = handles_.find(card);  // m_ was released while waiting: the entry may be gone (context released)
  if (it == handles_.end()) return false;
  it->second.beginning = true;
  return true;
}

void LibraryGate::leave_shared(Handle card, uint32_t rv, Change change) {
  {
    std::lock_guard lock(m_);
    --readers_;
    auto it = handles_.find(card);
    if (it != handles_.end()) {
      Entry& e = it->second;
      if (change == Change::kEnd && rv == sc::kSuccess && e.transactions > 0) --e.transactions;
      if (handle_gone(rv)) e.transactions = 0;
    }
  }
  cv_.notify_all();
}

void LibraryGate::leave_begin(Handle card, uint32_t rv, bool tracked, int64_t epoch) {
  {
    std::lock_guard lock(m_);
    --readers_;
    auto it = handles_.find(card);
    if (it != handles_.end() && tracked) {
      Entry& e = it->second;
      e.beginning = false;
      if (rv == sc::kSuccess && epoch != kGone) {
        if (e.transactions == 0) e.epoch = epoch;
        ++e.transactions;
      }
      if (handle_gone(rv)) e.transactions = 0;
    }
  }
  cv_.notify_all();
}

void LibraryGate::observe(const std::string& reader, uint32_t counter) {
  bool changed = false;
  {
    std::lock_guard lock(m_);
    for (auto& [h, e] : handles_) {
      if (e.reader == reader && e.transactions > 0 && e.epoch >= 0 && e.epoch != counter) {
        e.transactions = 0;  // the card was removed since: pcscd dropped the lock
        changed = true;
      }
    }
  }
  if (changed) cv_.notify_all();
}

void LibraryGate::leave_exclusive() {
  {
    std::lock_guard lock(m_);
    writer_ = false;
  }
  cv_.notify_all();
}

void LibraryGate::leave_connect(Context ctx, const std::string& reader, uint32_t rv, Handle made) {
  {
    std::lock_guard lock(m_);
    writer_ = false;
    if (rv == sc::kSuccess && made != 0) handles_[made] = Entry{ctx, reader, 0, false};
  }
  cv_.notify_all();
}

void LibraryGate::leave_disconnect(Handle card, uint32_t rv) {
  {
    std::lock_guard lock(m_);
    writer_ = false;
    if (rv == sc::kSuccess || handle_gone(rv)) handles_.erase(card);
  }
  cv_.notify_all();
}

void LibraryGate::leave_release(Context ctx) {
  {
    std::lock_guard lock(m_);
    writer_ = false;
    // Whatever pcscd answered, libpcsclite has forgotten the context and its handles.
    std::erase_if(handles_, [&](const auto& kv) { return kv.second.ctx == ctx; });
  }
  cv_.notify_all();
}

std::string LibraryGate::reader_of(Handle card) const {
  std::lock_guard lock(m_);
  auto it = handles_.find(card);
  return it == handles_.end() ? std::string() : it->second.reader;
}

bool LibraryGate::context_blocked(Context ctx) const {
  for (const auto& [h, e] : handles_) {
    if (e.ctx == ctx &&
        reader_locked(e.reader, [&](Handle other) { return handles_.at(other).ctx == ctx; })) {
      return true;
    }
  }
  return false;
}

std::size_t LibraryGate::tracked_handles() const {
  std::lock_guard lock(m_);
  return handles_.size();
}

int LibraryGate::transactions(Handle card) const {
  std::lock_guard lock(m_);
  auto it = handles_.find(card);
  return it == handles_.end() ? 0 : it->second.transactions;
}

}  // namespace cardbridge::client
