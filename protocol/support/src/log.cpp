#include "cardbridge/support/log.hpp"

#include <mutex>

#include <spdlog/sinks/stdout_sinks.h>

namespace cardbridge::log {
namespace {

std::mutex g_mutex;
spdlog::sink_ptr g_sink;
spdlog::level::level_enum g_level = spdlog::level::info;

spdlog::sink_ptr sink_locked() {
  if (!g_sink) g_sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  return g_sink;
}

}  // namespace

std::optional<spdlog::level::level_enum> parse_level(std::string_view name) {
  static constexpr std::pair<std::string_view, spdlog::level::level_enum> kNames[] = {
      {"trace", spdlog::level::trace}, {"debug", spdlog::level::debug},
      {"info", spdlog::level::info},   {"warn", spdlog::level::warn},
      {"warning", spdlog::level::warn}, {"error", spdlog::level::err},
      {"critical", spdlog::level::critical}, {"off", spdlog::level::off}};
  for (const auto& [n, l] : kNames) {
    if (n == name) return l;
  }
  return std::nullopt;
}

void init(spdlog::level::level_enum level, std::string_view program) {
  std::lock_guard lock(g_mutex);
  g_level = level;
  auto sink = sink_locked();
  sink->set_pattern(fmt::format("%Y-%m-%dT%H:%M:%S.%e {}[%P] %^%l%$ %n: %v", program));
  spdlog::apply_all([level](const std::shared_ptr<spdlog::logger>& l) { l->set_level(level); });
}

std::shared_ptr<spdlog::logger> get(const std::string& name) {
  std::lock_guard lock(g_mutex);
  if (auto existing = spdlog::get(name)) return existing;
  auto logger = std::make_shared<spdlog::logger>(name, sink_locked());
  logger->set_level(g_level);
  logger->flush_on(spdlog::level::warn);
  spdlog::register_logger(logger);
  return logger;
}

void set_sink(spdlog::sink_ptr sink) {
  std::lock_guard lock(g_mutex);
  g_sink = std::move(sink);
  spdlog::apply_all([](const std::shared_ptr<spdlog::logger>& l) {
    l->sinks().clear();
    l->sinks().push_back(g_sink);
  });
}

spdlog::logger& Channel::resolve() const {
  if (auto* l = cached_.load(std::memory_order_acquire)) return *l;
  auto* l = get(name_).get();  // registered: lives as long as the process
  cached_.store(l, std::memory_order_release);
  return *l;
}

std::string printable(std::string_view text) {
  std::string out;
  const std::size_t n = std::min<std::size_t>(text.size(), 256);
  out.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7F && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      out += fmt::format("\\x{:02X}", c);
    }
  }
  if (text.size() > n) out += "...";
  return out;
}

}  // namespace cardbridge::log
