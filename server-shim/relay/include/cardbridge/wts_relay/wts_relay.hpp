// WtsRelay: carries the CBRIDGE virtual channel of an RDP host built on libfreerdp-server2 and
// WinPR's WTS API onto a per-session UNIX socket, for hosts that cannot hand the channel to a
// program inside the session. The session's shim connects to it like to any desk:
//
//     cardbridge-shim --desk unix:PATH
//
// What it does
//   - Listens on PATH (its directory is created 0700 when missing and must belong to us or to
//     the allowed peer uid and be writable by nobody else; the socket is 0600; a stale socket
//     file is replaced, a live one is refused). Only connections whose SO_PEERCRED uid is the
//     allowed uid are accepted.
//   - Holds one shim connection at a time; a new connection replaces the old one.
//   - While a channel is attached, bytes flow both ways unchanged. Towards the channel they go
//     in whole frames ([u32 big-endian length][payload], see cardbridge/protocol/framing.hpp):
//     the relay buffers a frame until it is complete, so a shim that dies or is replaced in the
//     middle of a frame cannot desynchronise the desk's frame decoder (the add-in treats a bad
//     frame as fatal until its channel reopens, which a relay never does). A zero or oversized
//     length drops the shim connection. Towards the shim, channel messages are forwarded as
//     they arrive (the add-in writes whole frames per message).
//   - While no channel is attached, the shim connection stays open; whatever the shim sends is
//     read and dropped (frame by frame), and channel data has nowhere to go.
//   - When the attached channel goes away (detach_channel(), replaced by another attach, or
//     the client closed a dynamic channel) the relay CLOSES the shim connection: the shim sees
//     its desk vanish, fails what was pending, and reconnects; the next channel to be attached
//     (a reconnect, possibly from another desk) then serves that new connection.
//   - The RDP host's loop is never blocked by the shim: the socket is non-blocking, bytes for
//     the shim wait in a bounded queue (Options::max_queued_bytes), and a shim that lets it
//     overflow, or reads nothing for Options::stall_timeout while bytes wait, is dropped with a
//     log line.
//
// Threads and lifetime
//   - The relay runs its own thread (a poll(2) loop over the listening socket, the shim
//     connection, the attached channel's WinPR event and a wake-up eventfd). It calls
//     WTSVirtualChannelRead/Write/Query on the attached channel from that thread, which is how
//     FreeRDP's own server channels work: WinPR's channel queues are locked, and the host's
//     thread keeps calling WTSVirtualChannelManagerCheckFileDescriptor(), which is what puts
//     written data on the wire (the channel manager's event handle is signalled by the write).
//   - Every public method is thread-safe and may be called from any thread (typically the
//     host's per-peer threads). attach_channel() and detach_channel() return once the relay
//     thread has applied them: after detach_channel(id) returns -- or after an attach that
//     replaced id returned -- the relay never touches that channel handle again, and the host
//     may WTSVirtualChannelClose() it, close the peer and call WTSCloseServer().
//   - The host keeps ownership of channel handles: it opens them, attaches them once usable
//     (static: after WTSVirtualChannelOpen; dynamic: once WTSVirtualChannelQuery(...,
//     WTSVirtualChannelReady) says TRUE), detaches them, and closes them. It must detach a
//     channel before closing it or tearing its peer down.
//   - on_channel_lost runs on the relay thread; it must not call back into the relay (it may
//     set an event for the host's loop). The lost channel stays attached (and unused) until
//     the host detaches it or attaches another one.
//   - The destructor stops the thread, closes the shim connection and unlinks the socket file
//     if it is still ours. Channel handles are not touched.
#pragma once

#include <sys/types.h>
#include <winpr/wtypes.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/support/result.hpp"

namespace cardbridge::shim {

class WtsRelay {
 public:
  enum class ChannelKind { kStatic, kDynamic };
  // Names one attach_channel() call; never reused within a relay. 0 means "none".
  using AttachmentId = std::uint64_t;

  struct Options {
    std::string socket_path;
    // The only uid allowed to connect (SO_PEERCRED). Default: this process's effective uid.
    // When it differs (a host running as root for a user's session), the directory and socket
    // are handed to that uid.
    std::optional<uid_t> peer_uid;
    // Bytes from the channel waiting for a slow shim; above this the shim connection is dropped.
    std::size_t max_queued_bytes = 4u * 1024u * 1024u;
    // Bytes waiting and none written for this long: the shim connection is dropped.
    std::chrono::milliseconds stall_timeout{5000};
    // Largest frame payload accepted from the shim (the desk's decoder limit).
    std::size_t max_frame_payload = protocol::kDefaultMaxFrame;
    // The attached channel failed (a dynamic channel closed by the client, a write refused).
    // Runs on the relay thread; must not call the relay.
    std::function<void(AttachmentId, const std::string& reason)> on_channel_lost;
  };

  struct Stats {
    std::uint64_t bytes_to_shim = 0;          // channel -> shim, written to the socket
    std::uint64_t bytes_to_channel = 0;       // shim -> channel, handed to WTSVirtualChannelWrite
    std::uint64_t dropped_to_shim = 0;        // channel bytes with no shim to take them
    std::uint64_t dropped_to_channel = 0;     // shim bytes with no channel to take them
    std::uint64_t shim_connections = 0;       // accepted shim connections
    std::uint64_t shim_drops = 0;             // connections the relay closed (any reason)
    bool shim_connected = false;
    AttachmentId attached = 0;                // the attached channel, 0 if none
  };

  // Binds the socket and starts the relay thread.
  static Result<std::unique_ptr<WtsRelay>, std::string> start(Options options);
  ~WtsRelay();
  WtsRelay(const WtsRelay&) = delete;
  WtsRelay& operator=(const WtsRelay&) = delete;

  // Attaches an open channel; replaces (and thereby releases) the one attached before, which
  // closes the shim connection. |label| names the channel in log lines (e.g. the desk).
  AttachmentId attach_channel(HANDLE channel, ChannelKind kind, std::string label);
  // Releases |id| if it is still attached (and closes the shim connection); a no-op for an id
  // already replaced or detached. Either way, returns once the relay no longer uses it.
  void detach_channel(AttachmentId id, const std::string& reason);

  Stats stats() const;
  const std::string& socket_path() const;

 private:
  class Impl;
  explicit WtsRelay(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

const char* to_string(WtsRelay::ChannelKind kind);

}  // namespace cardbridge::shim
