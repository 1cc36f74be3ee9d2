// DeskCore: each PC/SC call's outcome (the steps of a request), speculation, replies and
// the lanes' retirement.
#include "desk_core_parts.hpp"

namespace cardbridge::client {

using namespace desk_detail;

void DeskCore::advance(Lane& lane, Task& task, CallResult r) {
  const pr::Request& q = task.req;
  switch (task.step) {
    case Task::Step::kEstablish:
      if (r.rv != sc::kSuccess) {
        logger->warn("cannot establish a PC/SC context: {}", sc::rv_text(r.rv));
        pr::Reply reply;
        reply.rv = r.rv;
        return finish(lane, reply);
      }
      lane.ctx = r.ctx;
      return start(lane, task);
    case Task::Step::kBegin:
      task.begun = true;
      task.reply.begin_rv = r.rv;
      if (r.rv != sc::kSuccess) {
        task.reply.rv = r.rv;
        return finish(lane, std::move(task.reply));
      }
      return start(lane, task);
    case Task::Step::kRelease: {
      for (auto h = handles_.begin(); h != handles_.end();) {
        h = h->second.lane == lane.id ? handles_.erase(h) : std::next(h);
      }
      lane.ctx.reset();
      finish(lane, pr::Reply{});
      return;
    }
    case Task::Step::kReestablish:
      if (task.reestablish == 1) {  // the dead context is gone, and its card handles with it
        for (auto h = handles_.begin(); h != handles_.end();) {
          h = h->second.lane == lane.id ? handles_.erase(h) : std::next(h);
        }
        lane.ctx.reset();
        task.reestablish = 2;
        return execute(lane, call::Establish{});
      }
      if (r.rv != sc::kSuccess) return finish(lane, std::move(task.reply));  // the Connect's own error
      lane.ctx = r.ctx;
      task.step = Task::Step::kOperation;
      task.reestablish = 3;  // no second retry
      return execute(lane, call::Connect{*lane.ctx, q.reader, q.share_mode, q.protocols});
    case Task::Step::kStatus:
      if (r.rv == sc::kSuccess) {
        task.reply.state = r.state;
        task.reply.atr = std::move(r.atr);
        task.reply.card_protocol = r.protocol;
        if (q.op == pr::Op::kReconnect && (q.disposition == sc::kResetCard || q.disposition == sc::kUnpowerCard)) {
          if (auto h = handles_.find(q.handle.value); h != handles_.end()) card_reset_seen(h->second.reader);
        }
      }
      if (q.op == pr::Op::kConnect) {
        // Audited before any image check (the card is connected either way).
        DeskAudit a;
        a.kind = DeskAudit::Kind::kCardConnected;
        a.server = server_name_;
        a.reader = q.reader;
        a.atr = task.reply.atr;
        a.share_mode = q.share_mode;
        fx_.audit(a);
        if (r.rv == sc::kSuccess && (q.flags & pr::request_flags::kWantImage) && start_image_check(lane, task)) return;
      }
      return finish(lane, std::move(task.reply));
    case Task::Step::kPrelude: {
      const Bytes& cmd = q.prelude[task.prelude_i];
      if (r.rv != sc::kSuccess) {  // the card is gone (or worse): the program gets that
        task.reply.rv = r.rv;
        return finish(lane, std::move(task.reply));
      }
      const auto* entry = handles_.contains(q.handle.value) ? &handles_.at(q.handle.value) : nullptr;
      if (entry) observe_card(entry->reader, cmd, r, /*program=*/false);
      CardTrack& track = lane.tracks[q.handle.value];
      observe(track, cmd, r.data, /*from_program=*/false);
      if (entry && ci::more_data(r.data)) {
        // The FCP of a SELECT the shim answered from the image: the desk's copy has it
        // (read-ahead needs the file's size).
        if (const auto* info = reader_info(entry->reader)) {
          if (auto held = images_->image(entry->reader, info->event_count)) {
            ci::ImageIndex index(std::move(held->image));
            if (const auto* s = index.select(cmd)) {
              if (auto fi = ci::parse_fcp(ci::ImageIndex::fcp_data(*s))) track.ef_size = fi->size;
            }
          }
        }
      }
      task.reply.prelude_answers.push_back(std::move(r.data));
      if (!ci::success(task.reply.prelude_answers.back())) {
        // The card did not take it: the program's command must not run in a state it does
        // not expect. The shim sees the short list of answers.
        return finish(lane, std::move(task.reply));
      }
      ++task.prelude_i;
      return start(lane, task);
    }
    case Task::Step::kImageCheck: {
      const std::size_t n = task.check_cmds.size();
      if (task.check_i == 0 || task.check_i == n + 1) {  // Begin / End
        if (r.rv != sc::kSuccess) task.check_ok = false;
      } else {
        const Bytes& cmd = task.check_cmds[task.check_i - 1];
        if (r.rv != sc::kSuccess || ci::status_word(r.data) != 0x9000) {
          if (task.check_i != 1 || r.rv != sc::kSuccess || !ci::success(r.data)) task.check_ok = false;
        } else if (ci::read_binary(cmd)) {
          task.check_data.insert(task.check_data.end(), r.data.begin(), r.data.end() - 2);
        }
        if (task.check_i == 1 && task.image) {
          // The SELECT must be answered as the image recorded it.
          ci::ImageIndex index(task.image->image);
          const auto* s = index.select(cmd);
          if (!s || s->response != r.data) task.check_ok = false;
        }
      }
      if (task.check_i == 0 && !task.check_ok) {  // no transaction: send nothing
        task.image.reset();
        return finish(lane, std::move(task.reply));
      }
      if (task.check_i <= n && !task.check_ok) task.check_i = n;  // straight to End
      ++task.check_i;
      if (task.check_i <= n) {
        return execute(lane, call::Transmit{task.card, task.reply.protocol, task.check_cmds[task.check_i - 1],
                                            task.reply.protocol, kSpeculativeCapacity});
      }
      if (task.check_i == n + 1) return execute(lane, call::End{task.card, sc::kLeaveCard});
      // Done: the marker as the image has it?
      const std::string reader = q.reader;
      ci::ImageIndex index(task.image->image);
      auto marker = Imager::update_marker(task.image->atr, task.image->image);
      const Bytes* held = marker ? index.file(*marker) : nullptr;
      if (task.check_ok && held && *held == task.check_data) {
        images_->mark_checked(reader, now_);
        attach_image(task);
      } else {
        task.image.reset();
        void_image(reader, "its card's update marker changed (or could not be read)");
      }
      return finish(lane, std::move(task.reply));
    }
    case Task::Step::kSpeculate:
      if (!speculate(lane, task, &r)) finish(lane, std::move(task.reply));
      return;
    case Task::Step::kFeatures: {
      // A reader without features (or one that fails the request) announces none: its
      // PIN-pad codes are then refused like any code not on the allow-list.
      auto h = handles_.find(q.handle.value);
      if (h != handles_.end()) {
        h->second.features = r.rv == sc::kSuccess
                                 ? feature::parse_features(std::span<const uint8_t>(r.data).first(std::min<std::size_t>(r.length, r.data.size())))
                                 : std::vector<ReaderFeature>{};
      }
      return start(lane, task);  // decided again, with the list known
    }
    case Task::Step::kOperation:
      break;
  }

  // The request's own call is back.
  pr::Reply& reply = task.reply;
  reply.rv = r.rv;
  switch (q.op) {
    case pr::Op::kConnect: {
      if ((r.rv == sc::kENoService || r.rv == sc::kFCommError || r.rv == sc::kEInvalidHandle) && task.reestablish == 0) {
        // The desk's pcscd restarted since this context was made: its context (and handles)
        // died with the old daemon. Start over with a fresh context.
        logger->info("context {}: PC/SC service restarted ({}); new context", lane.context, sc::rv_text(r.rv));
        task.step = Task::Step::kReestablish;
        task.reestablish = 1;
        return execute(lane, call::Release{*lane.ctx});
      }
      logger->debug("connect '{}' share {} -> {}", log::printable(q.reader), q.share_mode, sc::rv_text(r.rv));
      if (r.rv != sc::kSuccess) return finish(lane, std::move(reply));
      uint32_t hid = next_handle_++;
      if (next_handle_ == 0) next_handle_ = 1;
      handles_[hid] = HandleEntry{lane.id, r.card, q.reader};
      reply.handle = pr::DeskHandle{hid};
      reply.protocol = r.protocol;
      task.card = r.card;
      task.step = Task::Step::kStatus;
      return execute(lane, call::Status{r.card});
    }
    case pr::Op::kReconnect:
      if (r.rv != sc::kSuccess) return finish(lane, std::move(reply));
      reply.protocol = r.protocol;
      task.step = Task::Step::kStatus;
      return execute(lane, call::Status{task.card});
    case pr::Op::kDisconnect:
      if (r.rv == sc::kSuccess) {
        if (auto h = handles_.find(q.handle.value); h != handles_.end()) {
          if (q.disposition == sc::kResetCard || q.disposition == sc::kUnpowerCard) card_reset_seen(h->second.reader);
        }
        lane.tracks.erase(q.handle.value);
        handles_.erase(q.handle.value);
      }
      return finish(lane, std::move(reply));
    case pr::Op::kEndTransaction:
      if (r.rv == sc::kSuccess && (q.disposition == sc::kResetCard || q.disposition == sc::kUnpowerCard)) {
        if (auto h = handles_.find(q.handle.value); h != handles_.end()) card_reset_seen(h->second.reader);
      }
      return finish(lane, std::move(reply));
    case pr::Op::kTransmit:
      if (auto h = handles_.find(q.handle.value); h != handles_.end()) observe_card(h->second.reader, q.data, r, true);
      reply.protocol = r.protocol;
      reply.length = r.length;
      reply.data = std::move(r.data);
      if (logger->should_log(spdlog::level::debug)) {
        logger->debug("transmit {} -> {} {}", redact::Command{q.data}, sc::rv_text(r.rv),
                      r.rv == sc::kSuccess ? redact::response(q.data, reply.data) : "");
      }
      if (r.rv == sc::kSuccess && speculate(lane, task, nullptr)) return;
      return finish(lane, std::move(reply));
    case pr::Op::kControl:
    case pr::Op::kGetAttrib:
      reply.length = r.length;
      reply.data = std::move(r.data);
      if (q.op == pr::Op::kControl) {
        logger->debug("control {} -> {}", redact::Control{q.code, q.data}, sc::rv_text(r.rv));
        // A reader control may present a PIN (PIN pad) or reach the card otherwise.
        if (r.rv == sc::kSuccess) {
          if (auto h = handles_.find(q.handle.value); h != handles_.end()) {
            if (auto w = watches_.find(h->second.reader); w != watches_.end()) {
              w->second->secure = true;
              w->second->channels = {};
            }
          }
        }
      }
      return finish(lane, std::move(reply));
    case pr::Op::kStatus:
      reply.reader = std::move(r.reader);
      reply.state = r.state;
      reply.protocol = r.protocol;
      reply.atr = std::move(r.atr);
      return finish(lane, std::move(reply));
    default:
      return finish(lane, std::move(reply));
  }
}

// Speculation (docs/performance.md, speculation.hpp): after a successful Transmit, when the
// shim asked for it (request flags) and the session negotiated it (capabilities), the
// commands the program will send next go to the card at once and their answers ride along
// with the reply. |last| is the previous speculative call's result (nullptr: the program's
// Transmit just came back). Returns true when a speculative call is under way.
bool DeskCore::speculate(Lane& lane, Task& task, const CallResult* last) {
  const pr::Request& q = task.req;
  CardTrack& track = lane.tracks[q.handle.value];
  const bool want_gr =
      (q.flags & pr::request_flags::kPrefetchGetResponse) && link_.uses(pr::caps::kPrefetchGetResponse);
  const bool want_ra = (q.flags & pr::request_flags::kReadAhead) && link_.uses(pr::caps::kReadAhead);
  auto send_speculative = [&](Bytes cmd) {
    task.step = Task::Step::kSpeculate;
    task.spec_command = cmd;
    ++stats_.speculative_calls;
    execute(lane, call::Transmit{task.card, q.protocols, std::move(cmd), q.recv_protocol, kSpeculativeCapacity});
    return true;
  };

  if (!last) {
    observe(track, q.data, task.reply.data);
    if (!want_gr && !want_ra) return false;
    const auto& first = task.reply.data;
    if (want_gr && first.size() == 2 && first[0] == 0x61) return send_speculative(get_response_for(q.data, first[1]));
  } else {
    if (last->rv != sc::kSuccess) return false;
    observe(track, task.spec_command, last->data, /*from_program=*/false);
    if (auto h = handles_.find(q.handle.value); h != handles_.end())
      observe_card(h->second.reader, task.spec_command, *last, /*program=*/false);
    task.reply.prefetched.push_back(pr::Prefetched{task.spec_command, last->data});
    if (task.spec_reads_planned) {
      task.spec_bytes += last->data.size();
      // An error answer is served as it is, then nothing more is read.
      if (!is_9000(last->data) || task.spec_bytes > kMaxSpeculativeBytes) return false;
    }
  }

  if (!task.spec_reads_planned) {
    task.spec_reads_planned = true;
    if (!want_ra) return false;
    // Read-ahead: after a full READ BINARY chunk of a file whose size its FCP gave.
    auto rb = parse_read_binary(q.data);
    if (!rb) return false;
    const auto& first = task.reply.data;
    const bool full = first.size() == rb->le + 2 && is_9000(first);
    if (!full || !track.ef_size) return false;
    auto reads = predict_reads(rb->cla, rb->offset + rb->le, *track.ef_size, track.chunk);
    task.spec_reads.assign(std::make_move_iterator(reads.begin()), std::make_move_iterator(reads.end()));
  }
  if (task.spec_reads.empty()) return false;
  Bytes cmd = std::move(task.spec_reads.front());
  task.spec_reads.pop_front();
  return send_speculative(std::move(cmd));
}

void DeskCore::finish(Lane& lane, pr::Reply reply) {
  CARDBRIDGE_CHECK(lane.running && !lane.queue.empty());
  const uint32_t id = lane.queue.front().id;
  const bool release = lane.queue.front().req.op == pr::Op::kReleaseContext;
  lane.queue.pop_front();
  lane.running = false;
  link_.reply(id, reply);
  if (release) {
    close_lane(lane);  // the server released it: no context left, nothing queued behind
    task_done(id);
    publish_busy();
    consider_imaging();
    return;
  }
  const LaneId lid = lane.id;
  task_done(id);
  if (auto it = lanes_.find(lid); it != lanes_.end()) pump(*it->second);
  publish_busy();
  consider_imaging();  // the card this request used may be left alone now
}

void DeskCore::retire_all() {
  unfinished_.clear();
  handles_.clear();
  by_context_.clear();
  std::vector<LaneId> ids;
  for (const auto& [id, lane] : lanes_) ids.push_back(id);
  for (LaneId id : ids) {
    if (auto it = lanes_.find(id); it != lanes_.end()) retire(*it->second);
  }
}

void DeskCore::retire(Lane& lane) {
  if (lane.retired) return;
  lane.retired = true;
  // Queued requests never run; the one at the edge finishes there, unanswered.
  if (lane.running && lane.in_call) {
    Task current = std::move(lane.queue.front());
    lane.queue.clear();
    lane.queue.push_back(std::move(current));
  } else {
    lane.queue.clear();
    lane.running = false;
  }
  if (!lane.in_call) close_lane(lane);
}

// Releases the lane's PC/SC context (pcscd disconnects its handles, resetting the card
// where this context held a transaction or exclusive access: nothing leaks to the next
// user), then forgets the lane.
void DeskCore::close_lane(Lane& lane) {
  if (lane.in_call) return;  // call_done() comes back here
  if (lane.ctx) {
    lane.releasing = true;
    lane.running = false;
    lane.queue.clear();
    return execute(lane, call::Release{*lane.ctx});
  }
  const LaneId id = lane.id;
  for (auto it = by_context_.begin(); it != by_context_.end();) {
    it = it->second == id ? by_context_.erase(it) : std::next(it);
  }
  lanes_.erase(id);
  fx_.lane_closed(id);
}

}  // namespace cardbridge::client
