// cb-cardsim: a CPS-like card for the emulated desk. It plays the part of vsmartcard's
// vicc: it connects to the vpcd reader driver inside pcscd (TCP, 2-byte big-endian
// length + payload; 1-byte payloads are control codes) and answers APDUs with the
// card's timing (it sleeps: it is the card). See README.md next to this file.
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <openssl/evp.h>

#include "card.hpp"

namespace cs = cardbridge::cardsim;
using Clock = std::chrono::steady_clock;

namespace {

std::atomic<bool> g_stop{false};

void on_signal(int) { g_stop = true; }

std::string hex(const cs::Bytes& b, std::size_t max = 4096) {
  static const char* d = "0123456789ABCDEF";
  std::string s;
  for (std::size_t i = 0; i < b.size() && i < max; ++i) {
    s += d[b[i] >> 4];
    s += d[b[i] & 15];
  }
  if (b.size() > max) s += "..";
  return s;
}

class Log {
 public:
  explicit Log(const std::string& path) {
    if (path.empty()) return;
    f_ = path == "-" ? stderr : std::fopen(path.c_str(), "a");
    if (!f_) std::cerr << "cb-cardsim: cannot open log " << path << ": " << std::strerror(errno) << "\n";
  }
  ~Log() {
    if (f_ && f_ != stderr) std::fclose(f_);
  }
  template <typename... A>
  void line(const char* fmt, A... args) {
    if (!f_) return;
    const auto now = std::chrono::system_clock::now().time_since_epoch();
    std::fprintf(f_, "%.3f ", std::chrono::duration<double>(now).count());
    std::fprintf(f_, fmt, args...);
    std::fputc('\n', f_);
    std::fflush(f_);
  }

 private:
  std::FILE* f_ = nullptr;
};

int connect_to(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0) return -1;
  int fd = -1;
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) continue;
    if (::connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
    ::close(fd);
    fd = -1;
  }
  ::freeaddrinfo(res);
  if (fd >= 0) {
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  return fd;
}

// Reads exactly n bytes; false on EOF, error or stop request.
bool read_exact(int fd, uint8_t* p, std::size_t n) {
  while (n > 0) {
    pollfd pfd{fd, POLLIN, 0};
    int r = ::poll(&pfd, 1, 200);
    if (g_stop) return false;
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) continue;
    ssize_t got = ::recv(fd, p, n, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    p += got;
    n -= static_cast<std::size_t>(got);
  }
  return true;
}

bool send_frame(int fd, const cs::Bytes& payload) {
  cs::Bytes frame;
  frame.reserve(payload.size() + 2);
  frame.push_back(static_cast<uint8_t>(payload.size() >> 8));
  frame.push_back(static_cast<uint8_t>(payload.size() & 0xFF));
  frame.insert(frame.end(), payload.begin(), payload.end());
  std::size_t off = 0;
  while (off < frame.size()) {
    ssize_t n = ::send(fd, frame.data() + off, frame.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    off += static_cast<std::size_t>(n);
  }
  return true;
}

// The card's wire time, measured from when the command arrived.
void sleep_until(Clock::time_point t) {
  while (!g_stop && Clock::now() < t) {
    auto left = t - Clock::now();
    std::this_thread::sleep_for(std::min<Clock::duration>(left, std::chrono::milliseconds(100)));
  }
}

std::string pem(const cs::Bytes& der) {
  std::string b64(4 * ((der.size() + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(b64.data()), der.data(), static_cast<int>(der.size()));
  b64.resize(static_cast<std::size_t>(n));
  std::string out = "-----BEGIN CERTIFICATE-----\n";
  for (std::size_t i = 0; i < b64.size(); i += 64) out += b64.substr(i, 64) + "\n";
  return out + "-----END CERTIFICATE-----\n";
}

bool write_file(const std::string& path, const std::string& text) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return false;
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  return std::fclose(f) == 0 && ok;
}

// What tests compare the middleware's view with: the token label and serial, the holder, the ATR.
nlohmann::json card_info(const cs::CardSim& card) {
  const auto& c = card.content();
  return {{"profile", card.profile().name},
          {"atr", hex(card.atr())},
          {"token_label", card.token_label()},
          {"serial_digits", card.serial_digits()},
          // The Cryptolib's token serial: EF.SN.ICC's digits after the issuer number, without
          // the last byte (a check digit and padding on real cards).
          {"cryptolib_serial", card.serial_digits().substr(0, card.serial_digits().size() - 2)},
          {"holder", {{"id", c.holder.id}, {"given_name", c.holder.given_name}, {"surname", c.holder.surname},
                      {"common_name", c.holder.given_name + " " + c.holder.surname}}},
          {"ca_common_name", cs::kCaName},
          {"actua", c.actua},
          {"data_revision", c.data_revision},
          {"pin_reference", cs::CardSim::kPinRef}};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cb-cardsim: a simulated CPS card (CPS3/CPS4) for vsmartcard's vpcd reader in pcscd"};
  std::string profile_name = "cps3";
  std::string host = "127.0.0.1";
  int port = 35963;
  uint64_t seed = 1;
  std::string log_path;
  std::string pin = "1234";
  double time_scale = 1.0;
  bool print_files = false;
  bool print_info = false;
  std::string dump_dir;
  std::string export_dir;
  std::string actua = "20250115080000";
  unsigned data_revision = 1;
  app.add_option("--profile", profile_name, "cps3 (T=0, slow), cps4 (T=1, 12x faster I/O), instant (cps3 without delays)")
      ->check(CLI::IsMember({"cps3", "cps4", "instant"}))
      ->capture_default_str();
  app.add_option("--host", host, "where vpcd listens (the pcscd host)")->capture_default_str();
  app.add_option("--port", port, "vpcd port (35963 + slot)")->capture_default_str();
  app.add_option("--seed", seed, "seed of the key and certificates (same seed, same card)")->capture_default_str();
  app.add_option("--log", log_path, "append one line per event/APDU to this file ('-' = stderr); VERIFY data is never logged");
  app.add_option("--pin", pin, "the card's PIN (ASCII digits, padded to 8 bytes with FF or 00)")->capture_default_str();
  app.add_option("--time-scale", time_scale, "multiply every card delay (0 = instant)")->capture_default_str();
  app.add_flag("--print-files", print_files, "print the file system (path, size) and exit");
  app.add_option("--dump-dir", dump_dir, "write every EF to DIR/<path>.bin and exit");
  app.add_option("--export-dir", export_dir,
                 "write ca.pem (the simulator's CA), auth.pem, sign.pem (the card's certificates) and "
                 "info.json to DIR and exit");
  app.add_flag("--print-info", print_info, "print the card's identity as JSON (label, serial, holder, ATR) and exit");
  app.add_option("--actua", actua,
                 "EF_ACTUA start date YYYYMMDDhhmmss (the Cryptolib's cache check; a new date = a card update); "
                 "'empty' for an empty EF_ACTUA")
      ->capture_default_str();
  app.add_option("--data-revision", data_revision, "revision of the situation data (changes their content)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  auto profile = cs::Profile::named(profile_name);
  if (!profile) return 2;
  if (time_scale != 1.0) profile->timing = profile->timing.scaled(time_scale);
  if (pin.size() > 8) {
    std::cerr << "cb-cardsim: --pin: at most 8 characters\n";
    return 2;
  }
  auto t_gen = Clock::now();
  if (actua == "empty") {
    actua.clear();
  } else if (actua.size() != 14 || actua.find_first_not_of("0123456789") != std::string::npos) {
    std::cerr << "cb-cardsim: --actua: 14 digits YYYYMMDDhhmmss or 'empty'\n";
    return 2;
  }
  auto content = cs::make_content(seed);
  content.actua = actua;
  content.data_revision = data_revision;
  cs::CardSim card(*profile, std::move(content), pin);
  const double gen_ms = std::chrono::duration<double, std::milli>(Clock::now() - t_gen).count();
  if (!dump_dir.empty()) {
    for (const auto& [path, data] : card.files()) {
      std::FILE* f = std::fopen((dump_dir + "/" + path + ".bin").c_str(), "wb");
      if (!f) {
        std::cerr << "cb-cardsim: cannot write to " << dump_dir << "\n";
        return 1;
      }
      std::fwrite(data.data(), 1, data.size(), f);
      std::fclose(f);
    }
    return 0;
  }
  if (print_info || !export_dir.empty()) {
    const auto info = card_info(card);
    if (!export_dir.empty()) {
      const auto& c = card.content();
      if (!write_file(export_dir + "/ca.pem", pem(c.ca_cert)) || !write_file(export_dir + "/auth.pem", pem(c.cert_auth)) ||
          !write_file(export_dir + "/sign.pem", pem(c.cert_sign)) ||
          !write_file(export_dir + "/info.json", info.dump(2) + "\n")) {
        std::cerr << "cb-cardsim: cannot write to " << export_dir << "\n";
        return 1;
      }
    }
    if (print_info) std::cout << info.dump(2) << "\n";
    return 0;
  }
  if (print_files) {
    for (const auto& [path, size] : card.file_sizes()) std::cout << path << " " << size << "\n";
    return 0;
  }

  struct sigaction sa{};
  sa.sa_handler = on_signal;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  Log log(log_path);
  log.line("start profile=%s seed=%llu host=%s port=%d keygen_ms=%.0f", profile->name.c_str(),
           static_cast<unsigned long long>(seed), host.c_str(), port, gen_ms);
  uint64_t apdus = 0;
  bool announced_wait = false;
  while (!g_stop) {
    int fd = connect_to(host, port);
    if (fd < 0) {
      if (!announced_wait) log.line("waiting for vpcd at %s:%d", host.c_str(), port);
      announced_wait = true;
      for (int i = 0; i < 4 && !g_stop; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    announced_wait = false;
    log.line("connected to vpcd %s:%d", host.c_str(), port);
    card.reset();
    for (;;) {
      uint8_t hdr[2];
      if (!read_exact(fd, hdr, 2)) break;
      const std::size_t len = (std::size_t{hdr[0]} << 8) | hdr[1];
      cs::Bytes msg(len);
      if (len > 0 && !read_exact(fd, msg.data(), len)) break;
      const auto arrived = Clock::now();
      if (len == 1) {
        switch (msg[0]) {
          case 0x00: log.line("power off"); card.reset(); continue;
          case 0x01: log.line("power on"); card.reset(); continue;
          case 0x02: log.line("reset"); card.reset(); continue;
          case 0x04:
            if (!send_frame(fd, card.atr())) goto closed;
            continue;
          default: log.line("unknown control code %02X", msg[0]); continue;
        }
      }
      if (len == 0) continue;
      auto answer = card.process(msg);
      ++apdus;
      sleep_until(arrived + std::chrono::microseconds(static_cast<long>(answer.card_ms * 1000.0)));
      // VERIFY carries the PIN: log only its header.
      const bool secret = msg.size() > 1 && msg[1] == 0x20;
      log.line("apdu %llu cmd=%s%s rsp_len=%zu sw=%02X%02X card_ms=%.1f %s", static_cast<unsigned long long>(apdus),
               hex(secret ? cs::Bytes(msg.begin(), msg.begin() + std::min<long>(5, static_cast<long>(msg.size()))) : msg, 24).c_str(),
               secret ? "<redacted>" : "", answer.response.size() - 2, answer.response[answer.response.size() - 2],
               answer.response.back(), answer.card_ms, answer.note.c_str());
      if (!send_frame(fd, answer.response)) break;
    }
  closed:
    ::close(fd);
    if (!g_stop) log.line("vpcd closed the connection; reconnecting");
  }
  log.line("stop apdus=%llu", static_cast<unsigned long long>(apdus));
  return 0;
}
