// The desk link inside an xrdp session: the CBRIDGE virtual channel of the session's chansrv.
// In xrdp 0.9 a session program opens a channel over a UNIX socket to chansrv
// (<sockdir>/xrdpapi_<display>, the protocol libxrdpapi speaks; we speak it ourselves,
// asynchronously, see xrdp_channel.cpp) and that socket then carries the channel's bytes: an
// ordinary stream, so the shim's desk link code is the same as for a desk socket.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <string>

#include "cardbridge/shim_io/desk_link.hpp"

namespace cardbridge::shim {

// Which kind of CBRIDGE channel the shim opens in the xrdp session.
enum class XrdpChannelKind {
  kEither,   // both; the first one on which the desk speaks wins (the client opened that kind)
  kStatic,   // only the static channel (xfreerdp /vc:cardbridge)
  kDynamic,  // only the dynamic channel (xfreerdp /dvc:cardbridge)
};

struct XrdpOptions {
  XrdpChannelKind kind = XrdpChannelKind::kEither;
  std::string channel = "CBRIDGE";
};

// True when this process runs inside an xrdp session (chansrv's API socket exists for
// our DISPLAY).
bool in_xrdp_session();

// Whether chansrv's socket |entry| (lstat) in the socket directory |dir| (lstat) can be
// trusted by a shim running as |me|: a directory owned by root or by us, not writable by
// others unless sticky (/tmp/.xrdp is 1777: another user may create files there, not replace
// ours); an entry owned by us (chansrv runs as the session's user) or root. Another user's
// file (`touch /tmp/.xrdp/xrdpapi_77`) is refused, and so is a symbolic link.
bool xrdp_socket_trusted(const struct stat& dir, const struct stat& entry, uid_t me);

// A Connector that opens the channel (< 1 ms for a static channel, ~50 ms for a dynamic
// one) once an RDP client is attached to the session: while none is, it waits (polling a
// file, no channel traffic) instead of opening a channel nobody will answer.
//
// kEither (what `--desk rdp` and `--desk xrdp` use): the client decides, the server needs no
// setting. Both channels are opened; the desk's add-in speaks first on whichever its client
// opened (its hello, repeated until answered), so the first channel that carries bytes is the
// desk's: the other is closed and the bytes already read are handed on with the stream. A
// channel the client refuses (xrdp closes it) simply drops out of the race; when both drop
// out, the attempt fails and the desk link retries with its backoff. Every new connection
// (after the client left: a reconnect, possibly with the other kind) races again. Nothing is
// polled while waiting: an idle session without a desk costs no CPU and no channel traffic.
Connector xrdp_connector(boost::asio::io_context& io, XrdpOptions options);

// "xrdp:static", "xrdp:dynamic" or "xrdp" (either).
std::string describe(const XrdpOptions& options);

// For StreamDeskLink's health check: "" while an RDP client is attached to this xrdp session,
// else the reason to drop the channel. xrdp 0.9's chansrv listens on
// <sockdir>/xrdp_chansrv_socket_<display> only while no xrdp connection is attached (it stops
// listening, removing the file, when xrdp connects and listens again when xrdp goes away);
// it keeps the channel's socket open after the client left and drops what it is given, so
// an idle shim would otherwise never learn that the desk is gone. When the file's directory
// cannot be found (other xrdp layouts), the client counts as attached (no change).
std::string xrdp_client_gone();

}  // namespace cardbridge::shim
