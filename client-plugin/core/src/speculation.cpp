#include "cardbridge/desk_core/speculation.hpp"

#include "cardbridge/card_image/apdu.hpp"

namespace cardbridge::client {

using card_image::is_9000;

// File size among the data objects of an FCP/FCI: tag 80 (data bytes) wins over tag 81
// (total size); an FCP (62) nested in an FCI is searched too.
std::optional<uint32_t> size_in(std::span<const uint8_t> content, int depth) {
  std::optional<uint32_t> size80, size81;
  std::size_t pos = 0;
  uint32_t tag = 0;
  std::span<const uint8_t> v;
  while (pos < content.size() && card_image::next_tlv(content, pos, tag, v)) {
    if ((tag == 0x80 || tag == 0x81) && !v.empty() && v.size() <= 4) {
      uint32_t n = 0;
      for (uint8_t b : v) n = (n << 8) | b;
      (tag == 0x80 ? size80 : size81) = n;
    } else if (tag == 0x62 && depth == 0) {
      if (auto inner = size_in(v, 1); inner && !size80) size80 = inner;
    }
  }
  return size80 ? size80 : size81;
}

std::optional<uint32_t> fcp_file_size(std::span<const uint8_t> data) {
  std::size_t pos = 0;
  uint32_t tag = 0;
  std::span<const uint8_t> outer;
  if (!card_image::next_tlv(data, pos, tag, outer) || (tag != 0x62 && tag != 0x6F)) return std::nullopt;
  return size_in(outer, 0);
}

std::optional<ReadBinary> parse_read_binary(std::span<const uint8_t> c) {
  if (c.size() != 5 || c[1] != 0xB0 || (c[2] & 0x80)) return std::nullopt;
  return ReadBinary{c[0], (uint32_t{c[2]} << 8) | c[3], c[4] == 0 ? 256u : c[4]};
}

Apdu get_response_for(std::span<const uint8_t> command, uint8_t sw2) {
  uint8_t cla = command.empty() ? 0 : command[0];
  if (cla & 0x80) {
    cla = 0x00;  // proprietary class: middleware use the default class for GET RESPONSE
  } else if (cla & 0x40) {
    cla &= 0x4F;  // further interindustry: keep the channel, drop SM and chaining
  } else {
    cla &= 0x03;  // first interindustry: keep the channel, drop SM and chaining
  }
  return Apdu{cla, 0xC0, 0x00, 0x00, sw2};
}

std::vector<Apdu> predict_reads(uint8_t cla, uint32_t offset, uint32_t size, uint16_t chunk) {
  std::vector<Apdu> out;
  if (chunk == 0 || chunk > 256) return out;
  std::size_t bytes = 0;
  while (offset < size && offset <= 0x7FFF && out.size() < kMaxSpeculativeReads && bytes < kMaxSpeculativeBytes) {
    const uint32_t n = std::min<uint32_t>(chunk, size - offset);
    out.push_back(Apdu{cla, 0xB0, static_cast<uint8_t>(offset >> 8), static_cast<uint8_t>(offset & 0xFF),
                       static_cast<uint8_t>(n == 256 ? 0 : n)});
    offset += n;
    bytes += n;
  }
  return out;
}

void observe(CardTrack& t, std::span<const uint8_t> command, std::span<const uint8_t> response,
             bool from_program) {
  if (command.size() < 4) return;
  const uint8_t ins = command[1];
  const bool was_select = t.last_was_select;
  t.last_was_select = false;
  if (ins == 0xA4) {
    t.ef_size.reset();
    t.last_was_select = true;
    if (is_9000(response) && response.size() > 2) {
      t.ef_size = fcp_file_size(response.first(response.size() - 2));
      t.last_was_select = false;
    }
    return;
  }
  if (ins == 0xC0 && was_select && is_9000(response) && response.size() > 2) {
    t.ef_size = fcp_file_size(response.first(response.size() - 2));
    return;
  }
  if (auto rb = parse_read_binary(command); rb && from_program) {
    // Only a read that stops short of the end shows the program's chunk size: a read of a
    // file's tail (often the whole of a small file) says nothing about it.
    const bool tail = t.ef_size && rb->offset + rb->le >= *t.ef_size;
    if (!tail) t.chunk = static_cast<uint16_t>(rb->le);
    t.read_cla = rb->cla;
  }
}

}  // namespace cardbridge::client
