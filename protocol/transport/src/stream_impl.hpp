// Member definitions of BasicByteStream<S>, included where it is instantiated
// (stream.cpp for plain sockets, tls.cpp for TLS streams).
#pragma once

#include "cardbridge/transport/stream.hpp"

namespace cardbridge::transport {

namespace detail {
constexpr std::size_t kReadChunk = 64 * 1024;
}

template <typename S>
BasicByteStream<S>::BasicByteStream(S socket) : socket_(std::move(socket)), read_buf_(detail::kReadChunk) {}

template <typename S>
BasicByteStream<S>::~BasicByteStream() {
  boost::system::error_code ignored;
  socket_.lowest_layer().close(ignored);
}

template <typename S>
void BasicByteStream<S>::start(DataHandler on_data, CloseHandler on_close) {
  on_data_ = std::move(on_data);
  on_close_ = std::move(on_close);
  do_read();
}

template <typename S>
void BasicByteStream<S>::do_read() {
  socket_.async_read_some(asio::buffer(read_buf_),
                          [self = this->shared_from_this()](boost::system::error_code ec, std::size_t n) {
                            if (!self->open_) return;
                            if (ec) {
                              self->finish(ec == asio::error::eof ? "closed by peer" : ec.message());
                              return;
                            }
                            if (self->on_data_) self->on_data_(std::span<const uint8_t>(self->read_buf_.data(), n));
                            if (self->open_) self->do_read();
                          });
}

template <typename S>
void BasicByteStream<S>::send(std::vector<uint8_t> bytes) {
  if (!open_ || close_when_flushed_ || bytes.empty()) return;
  queued_bytes_ += bytes.size();
  writes_.push_back(std::move(bytes));
  if (!writing_) do_write();
}

template <typename S>
void BasicByteStream<S>::do_write() {
  writing_ = true;
  asio::async_write(socket_, asio::buffer(writes_.front()),
                    [self = this->shared_from_this()](boost::system::error_code ec, std::size_t) {
                      self->writing_ = false;
                      if (!self->open_) return;
                      if (ec) {
                        self->finish(ec.message());
                        return;
                      }
                      self->queued_bytes_ -= self->writes_.front().size();
                      self->writes_.pop_front();
                      if (!self->writes_.empty()) {
                        self->do_write();
                      } else if (self->close_when_flushed_) {
                        self->finish(self->close_reason_);
                      }
                    });
}

template <typename S>
void BasicByteStream<S>::close(const std::string& reason) {
  if (!open_) return;
  // The handlers never run again (every completion checks open_; close() is the owner's
  // decision, so no close callback) and are released: they usually hold their owner, which
  // holds this stream, and kept alive they would keep both (and the read buffer) for ever.
  // We may be inside one of them, so they are destroyed from the io_context, after the
  // current handler has returned (or with the io_context, if it never runs again).
  open_ = false;
  boost::system::error_code ignored;
  socket_.lowest_layer().shutdown(asio::socket_base::shutdown_both, ignored);
  socket_.lowest_layer().close(ignored);
  writes_.clear();
  queued_bytes_ = 0;
  release_handlers();
  (void)reason;
}

template <typename S>
void BasicByteStream<S>::release_handlers() {
  if (!on_data_ && !on_close_) return;
  asio::post(socket_.get_executor(), [data = std::move(on_data_), closed = std::move(on_close_)] {});
  on_data_ = nullptr;
  on_close_ = nullptr;
}

template <typename S>
void BasicByteStream<S>::close_after_flush(const std::string& reason) {
  if (!open_) return;
  if (!writing_ && writes_.empty()) {
    close(reason);
    return;
  }
  close_when_flushed_ = true;
  close_reason_ = reason;
}

template <typename S>
void BasicByteStream<S>::finish(const std::string& reason) {
  if (!open_) return;
  open_ = false;
  boost::system::error_code ignored;
  socket_.lowest_layer().close(ignored);
  writes_.clear();
  queued_bytes_ = 0;
  // The close handler runs (from a local: it may drop its owner and with it this stream's
  // last outside reference); the data handler is released as close() does.
  auto cb = std::move(on_close_);
  on_close_ = nullptr;
  release_handlers();
  if (cb) cb(reason);
}

}  // namespace cardbridge::transport
