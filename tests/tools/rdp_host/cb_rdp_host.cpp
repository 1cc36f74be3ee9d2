// cb-rdp-host: a test RDP host on libfreerdp-server (FreeRDP 2 or 3) + WinPR WTS that relays the CBRIDGE
// channel to `cardbridge-shim --desk unix:RELAY` through cardbridge::shim::WtsRelay.
//
//   cb-rdp-host --port P [--bind 127.0.0.1] (--cert FILE --key FILE | --make-cert DIR)
//               --relay PATH [--channel static|dynamic|both] [--log-level LEVEL]
//
// TLS only, NLA off, no authentication. Every peer maps to ONE session: a client that gets to
// the end of the connection sequence takes the session over, as an RDS reconnect from another
// desk does: the previous peer is closed (Close() then Disconnect()) and the relay switches to
// the new peer's channel. Prints "READY port=P" on stdout once listening (P is the real port
// when --port 0 was given), logs on stderr (FreeRDP's WLog too), and exits 0 on SIGTERM/SIGINT.
//
// Threads: the main thread runs the listener; each peer runs on its own thread (FreeRDP's
// sample-server model; a TLS handshake blocks its thread); the relay has its own thread.
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <spawn.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <freerdp/channels/channels.h>
#include <freerdp/channels/wtsvc.h>
#include <freerdp/freerdp.h>
#include <freerdp/listener.h>
#include <freerdp/peer.h>
#include <freerdp/settings.h>
#include <winpr/ssl.h>
#include <winpr/synch.h>
#include <winpr/wlog.h>

#include "common/winpr_tool.hpp"
#include <winpr/wtsapi.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>

#include "cardbridge/support/log.hpp"
#include "cardbridge/wts_relay/wts_relay.hpp"

namespace {

namespace cb = cardbridge;
using cb::shim::WtsRelay;

constexpr char kChannelName[] = "CBRIDGE";

cb::log::Channel logger{"cb-rdp-host"};

enum class Mode { kStatic, kDynamic, kBoth };

struct Config {
  std::string bind = "127.0.0.1";
  int port = 3389;
  std::string cert;
  std::string key;
  std::string make_cert_dir;
  std::string relay_path;
  Mode mode = Mode::kBoth;
};

// WTSOpenServerA() bumps an unlocked global session counter and lazily creates a global table:
// peer contexts are created and freed one at a time.
std::mutex g_context_mutex;

struct PeerContext {
  rdpContext base;  // first: FreeRDP allocates ContextSize bytes and hands back rdpContext*
  HANDLE vcm;
  class PeerConn* conn;
};

class Host;

// One RDP connection, on its own thread.
class PeerConn {
 public:
  PeerConn(Host& host, freerdp_peer* peer, int id);
  ~PeerConn();
  void start() { thread_ = std::thread([this] { run(); }); }
  // Thread-safe: makes the peer thread close its client and end.
  void request_stop(const std::string& reason);
  bool done() const { return done_.load(); }
  void join() {
    if (thread_.joinable()) thread_.join();
  }
  int id() const { return id_; }
  std::string describe() const;

  // FreeRDP callbacks (peer thread).
  BOOL on_post_connect();
  BOOL on_activate();

 private:
  void run();
  void setup();
  void poll_dynamic_channel();
  void drain_unrelayed_static();
  void teardown(bool closed_by_us);

  Host& host_;
  freerdp_peer* peer_;
  const int id_;
  HANDLE stop_event_ = nullptr;
  std::mutex mu_;
  std::string stop_reason_;
  std::thread thread_;
  std::atomic<bool> done_{false};

  // Peer thread only.
  HANDLE vcm_ = nullptr;
  HANDLE svc_ = nullptr;
  bool svc_relayed_ = false;
  HANDLE dvc_ = nullptr;
  bool dvc_given_up_ = false;
  BYTE drdynvc_state_ = DRDYNVC_STATE_NONE;
  WtsRelay::AttachmentId attachment_ = 0;
  std::string client_name_;
};

class Host {
 public:
  Host(Config config, WtsRelay& relay) : config_(std::move(config)), relay_(relay) {}
  const Config& config() const { return config_; }
  WtsRelay& relay() { return relay_; }

  void accepted(freerdp_peer* peer) {
    std::lock_guard lock(peers_mu_);
    reap_locked();
    auto conn = std::make_unique<PeerConn>(*this, peer, ++next_id_);
    logger->info("peer {}: connection from {}", next_id_, peer->hostname);
    conn->start();
    peers_.push_back(std::move(conn));
  }

  // The session's owner is the last peer to reach the end of the connection sequence.
  void take_over(PeerConn* p) {
    std::lock_guard lock(session_mu_);
    if (owner_ && owner_ != p) {
      logger->info("peer {} takes the session over from peer {}", p->id(), owner_->id());
      owner_->request_stop(fmt::format("session taken over by peer {}", p->id()));
    }
    owner_ = p;
  }
  void leave(PeerConn* p) {
    std::lock_guard lock(session_mu_);
    if (owner_ == p) owner_ = nullptr;
  }
  bool owns(PeerConn* p) {
    std::lock_guard lock(session_mu_);
    return owner_ == p;
  }

  void stop_all() {
    std::list<std::unique_ptr<PeerConn>> peers;
    {
      std::lock_guard lock(peers_mu_);
      for (auto& p : peers_) p->request_stop("host shutting down");
      peers.swap(peers_);
    }
    for (auto& p : peers) p->join();
  }

 private:
  void reap_locked() {
    for (auto it = peers_.begin(); it != peers_.end();) {
      if ((*it)->done()) {
        (*it)->join();
        it = peers_.erase(it);
      } else {
        ++it;
      }
    }
  }

  Config config_;
  WtsRelay& relay_;
  std::mutex peers_mu_;
  std::list<std::unique_ptr<PeerConn>> peers_;
  int next_id_ = 0;
  std::mutex session_mu_;
  PeerConn* owner_ = nullptr;
};

// Flushes the channel manager's queue. FreeRDP 3's plain CheckFileDescriptor also opens drdynvc
// (sends its capabilities) on the first call, before the client has joined the channel, and the
// dynamic channels then never get ready: open it ourselves once the peer is activated
// (FreeRDP 2 waits for that by itself).
BOOL check_channel_manager(HANDLE vcm) {
#if CARDBRIDGE_FREERDP_MAJOR >= 3
  return WTSVirtualChannelManagerCheckFileDescriptorEx(vcm, FALSE);
#else
  return WTSVirtualChannelManagerCheckFileDescriptor(vcm);
#endif
}

PeerConn* conn_of(freerdp_peer* peer) { return reinterpret_cast<PeerContext*>(peer->context)->conn; }

BOOL peer_context_new(freerdp_peer* peer, rdpContext* context) {
  auto* ctx = reinterpret_cast<PeerContext*>(context);
  ctx->vcm = WTSOpenServerA(reinterpret_cast<LPSTR>(peer->context));
  if (!ctx->vcm || ctx->vcm == INVALID_HANDLE_VALUE) {
    ctx->vcm = nullptr;
    return FALSE;
  }
  return TRUE;
}

void peer_context_free(freerdp_peer*, rdpContext* context) {
  auto* ctx = reinterpret_cast<PeerContext*>(context);
  if (ctx && ctx->vcm) WTSCloseServer(ctx->vcm);
  if (ctx) ctx->vcm = nullptr;
}

BOOL peer_post_connect(freerdp_peer* peer) {
  try {
    return conn_of(peer)->on_post_connect();
  } catch (const std::exception& e) {
    logger->error("post-connect: {}", e.what());
    return FALSE;
  }
}

BOOL peer_activate(freerdp_peer* peer) {
  try {
    return conn_of(peer)->on_activate();
  } catch (const std::exception& e) {
    logger->error("activate: {}", e.what());
    return FALSE;
  }
}

PeerConn::PeerConn(Host& host, freerdp_peer* peer, int id) : host_(host), peer_(peer), id_(id) {
  stop_event_ = CreateEventA(nullptr, TRUE, FALSE, nullptr);
}

PeerConn::~PeerConn() {
  join();
  if (stop_event_) CloseHandle(stop_event_);
}

void PeerConn::request_stop(const std::string& reason) {
  {
    std::lock_guard lock(mu_);
    if (stop_reason_.empty()) stop_reason_ = reason;
  }
  SetEvent(stop_event_);
}

std::string PeerConn::describe() const {
  return fmt::format("peer {} ({}{}{})", id_, peer_->hostname, client_name_.empty() ? "" : ", client ",
                     client_name_);
}

void PeerConn::setup() {
  peer_->ContextSize = sizeof(PeerContext);
  peer_->ContextNew = peer_context_new;
  peer_->ContextFree = peer_context_free;
  {
    std::lock_guard lock(g_context_mutex);
    if (!freerdp_peer_context_new(peer_)) throw std::runtime_error("freerdp_peer_context_new failed");
  }
  auto* ctx = reinterpret_cast<PeerContext*>(peer_->context);
  ctx->conn = this;
  vcm_ = ctx->vcm;

  rdpSettings* s = peer_->context->settings;
  const auto& cfg = host_.config();
#if CARDBRIDGE_FREERDP_MAJOR >= 3
  // FreeRDP 3 takes parsed objects; the settings own them once set.
  rdpCertificate* certificate = freerdp_certificate_new_from_file(cfg.cert.c_str());
  rdpPrivateKey* key = freerdp_key_new_from_file(cfg.key.c_str());
  const bool cert_ok = certificate && freerdp_settings_set_pointer_len(s, FreeRDP_RdpServerCertificate, certificate, 1);
  if (!cert_ok && certificate) freerdp_certificate_free(certificate);
  const bool key_ok = key && freerdp_settings_set_pointer_len(s, FreeRDP_RdpServerRsaKey, key, 1);
  if (!key_ok && key) freerdp_key_free(key);
  if (!cert_ok || !key_ok) throw std::runtime_error("cannot set the certificate");
#else
  if (!freerdp_settings_set_string(s, FreeRDP_CertificateFile, cfg.cert.c_str()) ||
      !freerdp_settings_set_string(s, FreeRDP_PrivateKeyFile, cfg.key.c_str()))
    throw std::runtime_error("cannot set the certificate");
#endif
  freerdp_settings_set_bool(s, FreeRDP_RdpSecurity, FALSE);
  freerdp_settings_set_bool(s, FreeRDP_TlsSecurity, TRUE);
  freerdp_settings_set_bool(s, FreeRDP_NlaSecurity, FALSE);
  freerdp_settings_set_bool(s, FreeRDP_ExtSecurity, FALSE);
  freerdp_settings_set_uint32(s, FreeRDP_ColorDepth, 32);
  freerdp_settings_set_bool(s, FreeRDP_RemoteFxCodec, FALSE);
  freerdp_settings_set_bool(s, FreeRDP_NSCodec, FALSE);
  freerdp_settings_set_bool(s, FreeRDP_SupportGraphicsPipeline, FALSE);
  peer_->PostConnect = peer_post_connect;
  peer_->Activate = peer_activate;
  if (!peer_->Initialize(peer_)) throw std::runtime_error("peer Initialize failed");
}

BOOL PeerConn::on_post_connect() {
  const char* client_name = freerdp_settings_get_string(peer_->context->settings, FreeRDP_ClientHostname);
  client_name_ = client_name ? client_name : "";
  logger->info("{}: connected", describe());
  host_.take_over(this);
  // A joined static channel must have a handle before the client sends on it, or the peer's
  // receive path fails and the connection drops: open it now even when it is not relayed.
  if (WTSVirtualChannelManagerIsChannelJoined(vcm_, kChannelName)) {
    svc_ = WTSVirtualChannelOpen(vcm_, WTS_CURRENT_SESSION, const_cast<LPSTR>(kChannelName));
    if (!svc_) {
      logger->error("{}: cannot open the static {} channel", describe(), kChannelName);
      return FALSE;
    }
    if (host_.config().mode != Mode::kDynamic) {
      attachment_ = host_.relay().attach_channel(svc_, WtsRelay::ChannelKind::kStatic, describe());
      svc_relayed_ = true;
    } else {
      logger->warn("{}: the client offers a static {} channel but this host relays the dynamic one only",
                     describe(), kChannelName);
    }
  } else if (host_.config().mode == Mode::kStatic) {
    logger->warn("{}: the client did not join a static {} channel (is its add-in loaded with /vc?)",
                   describe(), kChannelName);
  }
  return TRUE;
}

BOOL PeerConn::on_activate() {
  logger->debug("{}: activated", describe());
  return TRUE;
}

// Opens the dynamic channel once drdynvc is ready, and attaches it once the client accepted it.
void PeerConn::poll_dynamic_channel() {
  if (host_.config().mode == Mode::kStatic || svc_relayed_ || dvc_given_up_ || attachment_) return;
  if (!peer_->connected || !host_.owns(this)) return;
  if (!dvc_) {
    if (!WTSVirtualChannelManagerIsChannelJoined(vcm_, "drdynvc")) return;
#if CARDBRIDGE_FREERDP_MAJOR >= 3
    if (!peer_->activated) return;
    if (WTSVirtualChannelManagerGetDrdynvcState(vcm_) == DRDYNVC_STATE_NONE && !WTSVirtualChannelManagerOpen(vcm_)) {
      logger->error("{}: cannot open drdynvc", describe());
      dvc_given_up_ = true;
      return;
    }
#endif
    const BYTE state = WTSVirtualChannelManagerGetDrdynvcState(vcm_);
    if (state != drdynvc_state_) {
      logger->debug("{}: drdynvc state {}", describe(), static_cast<int>(state));
      drdynvc_state_ = state;
    }
    if (state != DRDYNVC_STATE_READY) return;
    LPSTR buf = nullptr;
    DWORD len = 0;
    DWORD session_id = 0;
    if (!WTSQuerySessionInformationA(vcm_, WTS_CURRENT_SESSION, WTSSessionId, &buf, &len) || !buf ||
        len < sizeof(ULONG)) {
      logger->error("{}: WTSQuerySessionInformation(WTSSessionId) failed", describe());
      dvc_given_up_ = true;
      return;
    }
    ULONG sid = 0;
    std::memcpy(&sid, buf, sizeof sid);
    WTSFreeMemory(buf);
    session_id = sid;
    dvc_ = WTSVirtualChannelOpenEx(session_id, const_cast<LPSTR>(kChannelName), WTS_CHANNEL_OPTION_DYNAMIC);
    if (!dvc_) {
      logger->error("{}: WTSVirtualChannelOpenEx(dynamic {}) failed", describe(), kChannelName);
      dvc_given_up_ = true;
      return;
    }
    logger->debug("{}: dynamic {} channel requested", describe(), kChannelName);
    return;
  }
  void* buf = nullptr;
  DWORD len = 0;
  BOOL ready = FALSE;
  const BOOL ok = WTSVirtualChannelQuery(dvc_, WTSVirtualChannelReady, &buf, &len);
  if (buf && len >= sizeof ready) std::memcpy(&ready, buf, sizeof ready);
  if (buf) WTSFreeMemory(buf);
  if (!ok) {
    logger->warn("{}: the client refused the dynamic {} channel (is its add-in loaded with /dvc?)", describe(),
                   kChannelName);
    WTSVirtualChannelClose(dvc_);
    dvc_ = nullptr;
    dvc_given_up_ = true;
    return;
  }
  if (ready) attachment_ = host_.relay().attach_channel(dvc_, WtsRelay::ChannelKind::kDynamic, describe());
}

// A static channel that is open but not relayed: read and discard, so its queue stays empty.
void PeerConn::drain_unrelayed_static() {
  if (!svc_ || svc_relayed_) return;
  char buf[4096];
  ULONG n = 0;
  while (WTSVirtualChannelRead(svc_, 0, buf, sizeof buf, &n) && n > 0) {
  }
}

void PeerConn::run() {
  bool closed_by_us = false;
  std::string why = "client disconnected";
  try {
    setup();
    for (;;) {
      HANDLE handles[40];
      DWORD count = peer_->GetEventHandles(peer_, handles, 32);
      if (count == 0) {
        why = "no transport event handles";
        break;
      }
      handles[count++] = WTSVirtualChannelManagerGetEventHandle(vcm_);
      handles[count++] = stop_event_;
      if (svc_ && !svc_relayed_) {
        void* buf = nullptr;
        DWORD len = 0;
        if (WTSVirtualChannelQuery(svc_, WTSVirtualEventHandle, &buf, &len) && buf && len >= sizeof(HANDLE)) {
          std::memcpy(&handles[count++], buf, sizeof(HANDLE));
        }
        if (buf) WTSFreeMemory(buf);
      }
      // A short timeout: data the TLS layer has already buffered signals no handle.
      const DWORD status = WaitForMultipleObjects(count, handles, FALSE, 100);
      if (status == WAIT_FAILED) {
        why = "WaitForMultipleObjects failed";
        break;
      }
      if (WaitForSingleObject(stop_event_, 0) == WAIT_OBJECT_0) {
        std::lock_guard lock(mu_);
        why = stop_reason_;
        closed_by_us = true;
        break;
      }
      if (!peer_->CheckFileDescriptor(peer_)) break;
      if (!check_channel_manager(vcm_)) {
        why = "channel manager failed";
        break;
      }
      poll_dynamic_channel();
      drain_unrelayed_static();
    }
  } catch (const std::exception& e) {
    why = e.what();
    logger->error("peer {}: {}", id_, e.what());
  }
  logger->info("{}: ending ({})", describe(), why);
  teardown(closed_by_us);
  done_ = true;
}

void PeerConn::teardown(bool closed_by_us) {
  if (attachment_) host_.relay().detach_channel(attachment_, "peer " + std::to_string(id_) + " ends");
  attachment_ = 0;
  if (dvc_) WTSVirtualChannelClose(dvc_);
  if (svc_) WTSVirtualChannelClose(svc_);
  dvc_ = svc_ = nullptr;
  if (closed_by_us && peer_->context && peer_->connected) {
    // Flush what is queued (a dynamic channel's close request), then the orderly disconnect:
    // Deactivate All and the Disconnect Provider Ultimatum, so the client ends without error.
    if (vcm_) check_channel_manager(vcm_);
    peer_->Close(peer_);
  }
  if (peer_->context) peer_->Disconnect(peer_);
  host_.leave(this);
  {
    std::lock_guard lock(g_context_mutex);
    if (peer_->context) freerdp_peer_context_free(peer_);
  }
  freerdp_peer_free(peer_);
  peer_ = nullptr;
}

Host* g_host = nullptr;

BOOL on_peer_accepted(freerdp_listener*, freerdp_peer* peer) {
  try {
    g_host->accepted(peer);
    return TRUE;
  } catch (const std::exception& e) {
    logger->error("cannot serve a new peer: {}", e.what());
    return FALSE;
  }
}

// Runs the openssl CLI to create DIR/server.crt and DIR/server.key (kept if they exist).
bool make_cert(const std::string& dir, std::string* cert, std::string* key) {
  ::mkdir(dir.c_str(), 0700);
  *cert = dir + "/server.crt";
  *key = dir + "/server.key";
  if (::access(cert->c_str(), R_OK) == 0 && ::access(key->c_str(), R_OK) == 0) return true;
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  const char* argv[] = {"openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-batch",
                        "-keyout",  key->c_str(), "-out", cert->c_str(), "-days", "30",
                        "-subj",    "/CN=cb-rdp-host", nullptr};
  pid_t pid = 0;
  const int rc = ::posix_spawnp(&pid, "openssl", &actions, nullptr, const_cast<char* const*>(argv), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return false;
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// The port the listener bound (--port 0): FreeRDP 3 no longer hands out the listener's sockets,
// so look at this process's own listening TCP sockets (the listener's are the only ones).
uint16_t listener_port() {
  DIR* d = ::opendir("/proc/self/fd");
  if (!d) return 0;
  uint16_t port = 0;
  while (const dirent* e = ::readdir(d)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end) continue;
    int listening = 0;
    socklen_t optlen = sizeof listening;
    if (::getsockopt(static_cast<int>(fd), SOL_SOCKET, SO_ACCEPTCONN, &listening, &optlen) != 0 || !listening)
      continue;
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getsockname(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&ss), &len) != 0) continue;
    if (ss.ss_family == AF_INET) port = ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    if (ss.ss_family == AF_INET6) port = ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
    if (port) break;
  }
  ::closedir(d);
  return port;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cb-rdp-host: test RDP host (FreeRDP server) relaying the CBRIDGE channel to a shim socket"};
  Config cfg;
  std::string mode = "both";
  std::string level = "info";
  app.add_option("--port", cfg.port, "TCP port (0: any free port, printed in the READY line)")->required();
  app.add_option("--bind", cfg.bind, "address to listen on")->capture_default_str();
  auto* cert = app.add_option("--cert", cfg.cert, "TLS certificate (PEM)");
  auto* key = app.add_option("--key", cfg.key, "TLS private key (PEM)");
  auto* make = app.add_option("--make-cert", cfg.make_cert_dir,
                              "create (or reuse) DIR/server.crt and DIR/server.key with the openssl CLI");
  cert->needs(key);
  key->needs(cert);
  make->excludes(cert)->excludes(key);
  app.add_option("--relay", cfg.relay_path, "UNIX socket for `cardbridge-shim --desk unix:PATH`")->required();
  app.add_option("--channel", mode, "which CBRIDGE channel to relay")
      ->check(CLI::IsMember({"static", "dynamic", "both"}))
      ->capture_default_str();
  app.add_option("--log-level", level, "trace, debug, info, warn, error")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (cfg.cert.empty() && cfg.make_cert_dir.empty()) {
    std::fprintf(stderr, "cb-rdp-host: give --cert/--key or --make-cert DIR\n");
    return 2;
  }
  cfg.mode = mode == "static" ? Mode::kStatic : mode == "dynamic" ? Mode::kDynamic : Mode::kBoth;
  auto lvl = cb::log::parse_level(level);
  if (!lvl) {
    std::fprintf(stderr, "cb-rdp-host: unknown log level '%s'\n", level.c_str());
    return 2;
  }
  cb::log::init(*lvl, "cb-rdp-host");
  cardbridge::testtools::route_wlog_to_stderr(*lvl);

  // Signals go to one thread that turns them into an event for the main loop.
  cardbridge::testtools::StopOnSignal signals([](int sig) { logger->info("signal {}: stopping", sig); });
  HANDLE stop = signals.event();

  int rc = 0;
  if (!cfg.make_cert_dir.empty() && !make_cert(cfg.make_cert_dir, &cfg.cert, &cfg.key)) {
    logger->critical("cannot create a certificate in {} (is the openssl CLI installed?)", cfg.make_cert_dir);
    rc = 1;
  } else if (::access(cfg.cert.c_str(), R_OK) != 0 || ::access(cfg.key.c_str(), R_OK) != 0) {
    logger->critical("cannot read the certificate {} or the key {}", cfg.cert, cfg.key);
    rc = 2;
  }

  std::unique_ptr<WtsRelay> relay;
  if (rc == 0) {
    WtsRelay::Options ro;
    ro.socket_path = cfg.relay_path;
    auto r = WtsRelay::start(std::move(ro));
    if (!r) {
      logger->critical("relay: {}", r.error());
      rc = 1;
    } else {
      relay = std::move(*r);
    }
  }

  freerdp_listener* listener = nullptr;
  std::unique_ptr<Host> host;
  if (rc == 0) {
    WTSRegisterWtsApiFunctionTable(FreeRDP_InitWtsApi());
    winpr_InitializeSSL(WINPR_SSL_INIT_DEFAULT);
    host = std::make_unique<Host>(cfg, *relay);
    g_host = host.get();
    listener = freerdp_listener_new();
    listener->PeerAccepted = on_peer_accepted;
    if (!listener->Open(listener, cfg.bind.c_str(), static_cast<UINT16>(cfg.port))) {
      logger->critical("cannot listen on {}:{}", cfg.bind, cfg.port);
      rc = 1;
    }
  }

  if (rc == 0) {
    const uint16_t port = listener_port();
    logger->info("listening on {}:{} (channel {}, relay {})", cfg.bind, port, mode, cfg.relay_path);
    std::printf("READY port=%u\n", static_cast<unsigned>(port));
    std::fflush(stdout);
    for (;;) {
      HANDLE handles[33];
      DWORD count = listener->GetEventHandles(listener, handles, 32);
      if (count == 0) {
        logger->error("listener has no event handles");
        rc = 1;
        break;
      }
      handles[count++] = stop;
      if (WaitForMultipleObjects(count, handles, FALSE, INFINITE) == WAIT_FAILED) {
        logger->error("WaitForMultipleObjects failed");
        rc = 1;
        break;
      }
      if (WaitForSingleObject(stop, 0) == WAIT_OBJECT_0) break;
      if (!listener->CheckFileDescriptor(listener)) {
        logger->error("listener failed");
        rc = 1;
        break;
      }
    }
  }

  if (host) host->stop_all();
  if (listener) {
    listener->Close(listener);
    freerdp_listener_free(listener);
  }
  relay.reset();
  host.reset();
  logger->info("stopped");
  return rc;
}
