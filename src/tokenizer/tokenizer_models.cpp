// Tokenization models: BPE (HF merges, or SentencePiece scores) and Unigram (Viterbi).
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <queue>

#include "core/error.h"
#include "tokenizer/tokenizer_impl.h"

namespace kiln::tok {

using json = nlohmann::json;

namespace {

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  return x;
}

inline uint64_t load64(const char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint64_t load32(const char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// A fast non-cryptographic hash; words are short, so the tail is read with overlapping loads.
inline uint64_t hash_bytes(std::string_view s) {
  const char* p = s.data();
  size_t n = s.size();
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ (n * 0xff51afd7ed558ccdULL);
  if (n >= 8) {
    size_t i = 0;
    for (; i + 8 < n; i += 8) h = (h ^ load64(p + i)) * 0xbf58476d1ce4e5b9ULL, h ^= h >> 31;
    h = (h ^ load64(p + n - 8)) * 0x94d049bb133111ebULL;
  } else if (n >= 4) {
    h = (h ^ (load32(p) | (load32(p + n - 4) << 32))) * 0x94d049bb133111ebULL;
  } else if (n > 0) {
    uint64_t v = static_cast<unsigned char>(p[0]) | (static_cast<unsigned char>(p[n / 2]) << 8) |
                 (static_cast<uint64_t>(static_cast<unsigned char>(p[n - 1])) << 16);
    h = (h ^ v) * 0x94d049bb133111ebULL;
  }
  return mix64(h);
}

// Open-addressing map from a 64-bit key to a 64-bit value (no deletions).
class U64Map {
 public:
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    keys_.assign(cap, kEmpty);
    vals_.assign(cap, 0);
    mask_ = cap - 1;
  }
  // Inserts or overwrites.
  void put(uint64_t k, uint64_t v) {
    size_t i = mix64(k) & mask_;
    while (keys_[i] != kEmpty && keys_[i] != k) i = (i + 1) & mask_;
    keys_[i] = k;
    vals_[i] = v;
  }
  const uint64_t* get(uint64_t k) const {
    if (keys_.empty()) return nullptr;
    size_t i = mix64(k) & mask_;
    while (true) {
      if (keys_[i] == k) return &vals_[i];
      if (keys_[i] == kEmpty) return nullptr;
      i = (i + 1) & mask_;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~0ULL;
  std::vector<uint64_t> keys_, vals_;
  size_t mask_ = 0;
};

// Open-addressing map from a string (stored in an arena) to an id.
class StrMap {
 public:
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
  }
  // Keeps the first id for a duplicate key unless overwrite.
  void put(std::string_view k, int32_t id, bool overwrite = true) {
    uint64_t h = hash_bytes(k);
    size_t i = h & mask_;
    while (slots_[i].id >= 0) {
      if (slots_[i].hash == h && key(slots_[i]) == k) {
        if (overwrite) slots_[i].id = id;
        return;
      }
      i = (i + 1) & mask_;
    }
    slots_[i] = Slot{h, static_cast<uint32_t>(arena_.size()), static_cast<uint32_t>(k.size()), id};
    arena_.append(k);
  }
  int32_t get(std::string_view k) const { return get(k, hash_bytes(k)); }
  int32_t get(std::string_view k, uint64_t h) const {
    if (slots_.empty()) return -1;
    size_t i = h & mask_;
    while (slots_[i].id >= 0) {
      if (slots_[i].hash == h && key(slots_[i]) == k) return slots_[i].id;
      i = (i + 1) & mask_;
    }
    return -1;
  }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint32_t off = 0, len = 0;
    int32_t id = -1;
  };
  std::string_view key(const Slot& s) const {
    return std::string_view(arena_).substr(s.off, s.len);
  }
  std::vector<Slot> slots_;
  std::string arena_;
  size_t mask_ = 0;
};

// Per-thread cache of short word -> ids (as HF's BPE cache): common words repeat a lot, and a hit
// costs one cache line instead of vocab probes and merges. Keyed by a model serial number so
// that a new model at a recycled address never sees stale entries.
struct alignas(64) CacheEntry {
  uint64_t hash;
  uint8_t len, n;
  char key[30];
  int32_t ids[5];
};
constexpr size_t kCacheEntries = 8192;
constexpr size_t kCacheMaxKey = sizeof(CacheEntry::key);
constexpr size_t kCacheMaxIds = sizeof(CacheEntry::ids) / sizeof(int32_t);

CacheEntry* thread_cache(uint64_t serial) {
  struct Slot {
    uint64_t serial = 0;
    std::unique_ptr<CacheEntry[]> entries;
  };
  thread_local std::array<Slot, 4> slots;
  thread_local size_t victim = 0;
  for (Slot& s : slots)
    if (s.serial == serial) return s.entries.get();
  Slot& s = slots[victim++ % slots.size()];
  if (!s.entries) s.entries.reset(new CacheEntry[kCacheEntries]);
  std::memset(static_cast<void*>(s.entries.get()), 0, sizeof(CacheEntry) * kCacheEntries);
  s.serial = serial;
  return s.entries.get();
}

std::atomic<uint64_t> g_model_serial{0};

inline uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// The BPE model. Merges are (left id, right id) -> (rank, merged id); lower rank merges first,
// ties go to the leftmost pair, exactly like HF's Word::merge_all.
class Bpe : public Model {
 public:
  // vocab: id -> token (gaps allowed: empty optional).
  std::vector<std::optional<std::string>> id_to_tok;
  StrMap vocab;  // key space: token strings, or raw bytes in byte-level mode
  U64Map merges;
  bool raw = false;  // pieces are raw bytes; byte_ids maps each byte to its token
  std::array<int32_t, 256> byte_ids{};
  std::array<int32_t, 256> fallback_ids{};  // "<0xAB>" tokens, -1 when absent
  bool byte_fallback = false, fuse_unk = false, ignore_merges = false;
  int32_t unk_id = -1;
  std::string prefix, suffix;

  std::optional<int32_t> token_to_id(std::string_view t) const override {
    int32_t id = vocab_orig.get(t);
    if (id < 0) return std::nullopt;
    return id;
  }
  const std::string* id_to_token(int32_t id) const override {
    if (id < 0 || static_cast<size_t>(id) >= id_to_tok.size() || !id_to_tok[id]) return nullptr;
    return &*id_to_tok[id];
  }
  size_t vocab_size() const override { return n_tokens; }
  size_t id_limit() const override { return id_to_tok.size(); }

  void encode(std::string_view w, std::vector<int32_t>& out) const override {
    if (w.empty()) return;
    CacheEntry* entry = nullptr;
    uint64_t h = hash_bytes(w);
    if (w.size() <= kCacheMaxKey) {
      entry = &thread_cache(serial)[h & (kCacheEntries - 1)];
      if (entry->hash == h && entry->len == w.size() &&
          std::memcmp(entry->key, w.data(), w.size()) == 0) {
        out.insert(out.end(), entry->ids, entry->ids + entry->n);
        return;
      }
    }
    thread_local std::vector<int32_t> syms;
    syms.clear();
    int32_t id = ignore_merges ? vocab.get(w, h) : -1;
    if (id >= 0) {
      syms.push_back(id);
    } else {
      initial_symbols(w, syms);
      merge(syms);
    }
    out.insert(out.end(), syms.begin(), syms.end());
    if (entry && syms.size() <= kCacheMaxIds) {
      entry->hash = h;
      entry->len = static_cast<uint8_t>(w.size());
      entry->n = static_cast<uint8_t>(syms.size());
      std::memcpy(entry->key, w.data(), w.size());
      std::copy(syms.begin(), syms.end(), entry->ids);
    }
  }

  uint64_t serial = ++g_model_serial;

  StrMap vocab_orig;  // token string -> id (for token_to_id)
  size_t n_tokens = 0;

 private:
  void add_unknown(std::string_view piece_text, int32_t& pending_unk,
                   std::vector<int32_t>& syms) const {
    if (byte_fallback) {
      bool ok = true;
      for (unsigned char c : piece_text) ok = ok && fallback_ids[c] >= 0;
      if (ok) {
        // HF pushes the byte tokens before any pending (fused) unk.
        for (unsigned char c : piece_text) syms.push_back(fallback_ids[c]);
        return;
      }
    }
    if (unk_id < 0) return;  // HF silently drops the char when there is no unk token
    if (pending_unk >= 0 && !fuse_unk) syms.push_back(pending_unk);
    pending_unk = unk_id;
  }

  void initial_symbols(std::string_view w, std::vector<int32_t>& syms) const {
    int32_t pending_unk = -1;
    if (raw) {
      for (unsigned char c : w) {
        int32_t id = byte_ids[c];
        if (id >= 0) {
          if (pending_unk >= 0) {
            syms.push_back(pending_unk);
            pending_unk = -1;
          }
          syms.push_back(id);
        } else {
          std::string mapped;
          append_utf8(mapped, bytes_to_chars()[c]);
          add_unknown(mapped, pending_unk, syms);
        }
      }
    } else {
      std::string tmp;
      for (size_t i = 0; i < w.size();) {
        size_t b = i;
        i += utf8_char_len(w, i);
        std::string_view s = w.substr(b, i - b);
        bool first = b == 0, last = i >= w.size();
        if ((!first && !prefix.empty()) || (last && !suffix.empty())) {
          tmp.clear();
          if (!first) tmp += prefix;
          tmp += s;
          if (last) tmp += suffix;
          s = tmp;
        }
        int32_t id = vocab.get(s);
        if (id >= 0) {
          if (pending_unk >= 0) {
            syms.push_back(pending_unk);
            pending_unk = -1;
          }
          syms.push_back(id);
        } else {
          add_unknown(s, pending_unk, syms);
        }
      }
    }
    if (pending_unk >= 0) syms.push_back(pending_unk);
  }

  bool lookup(int32_t a, int32_t b, int32_t& rank, int32_t& id) const {
    const uint64_t* v = merges.get(pair_key(a, b));
    if (!v) return false;
    rank = static_cast<int32_t>(*v >> 32);
    id = static_cast<int32_t>(*v & 0xffffffffu);
    return true;
  }

  void merge(std::vector<int32_t>& syms) const {
    size_t n = syms.size();
    if (n < 2) return;
    if (n > 96) return merge_long(syms);
    // Short words: keep the rank of every adjacent pair and scan for the minimum.
    int32_t rank[96], nid[96];
    for (size_t i = 0; i + 1 < n; ++i)
      if (!lookup(syms[i], syms[i + 1], rank[i], nid[i])) rank[i] = INT32_MAX;
    while (n > 1) {
      int32_t best = INT32_MAX;
      size_t bi = 0;
      for (size_t i = 0; i + 1 < n; ++i)
        if (rank[i] < best) best = rank[i], bi = i;
      if (best == INT32_MAX) break;
      syms[bi] = nid[bi];
      for (size_t i = bi + 1; i + 1 < n; ++i) syms[i] = syms[i + 1];
      for (size_t i = bi; i + 2 < n; ++i) rank[i] = rank[i + 1], nid[i] = nid[i + 1];
      --n;
      if (bi > 0 && !lookup(syms[bi - 1], syms[bi], rank[bi - 1], nid[bi - 1]))
        rank[bi - 1] = INT32_MAX;
      if (bi + 1 < n && !lookup(syms[bi], syms[bi + 1], rank[bi], nid[bi])) rank[bi] = INT32_MAX;
    }
    syms.resize(n);
  }

  // Long words: HF's algorithm (priority queue + linked list), O(n log n).
  void merge_long(std::vector<int32_t>& syms) const {
    struct Sym {
      int32_t id, prev, next;
      bool alive;
    };
    struct Entry {
      int32_t rank, pos, new_id;
      bool operator<(const Entry& o) const {
        return rank != o.rank ? rank > o.rank : pos > o.pos;  // min-heap on (rank, pos)
      }
    };
    std::vector<Sym> s(syms.size());
    for (size_t i = 0; i < syms.size(); ++i)
      s[i] = Sym{syms[i], static_cast<int32_t>(i) - 1,
                 i + 1 < syms.size() ? static_cast<int32_t>(i + 1) : -1, true};
    std::priority_queue<Entry> q;
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      int32_t r, id;
      if (lookup(s[i].id, s[i + 1].id, r, id)) q.push(Entry{r, static_cast<int32_t>(i), id});
    }
    while (!q.empty()) {
      Entry top = q.top();
      q.pop();
      Sym& cur = s[top.pos];
      if (!cur.alive || cur.next < 0) continue;
      int32_t r, id;
      if (!lookup(cur.id, s[cur.next].id, r, id) || id != top.new_id) continue;
      Sym& right = s[cur.next];
      cur.id = top.new_id;
      right.alive = false;
      cur.next = right.next;
      if (right.next >= 0) s[right.next].prev = top.pos;
      if (cur.prev >= 0 && lookup(s[cur.prev].id, cur.id, r, id)) q.push(Entry{r, cur.prev, id});
      if (cur.next >= 0 && lookup(cur.id, s[cur.next].id, r, id)) q.push(Entry{r, top.pos, id});
    }
    syms.clear();
    for (const Sym& x : s)
      if (x.alive) syms.push_back(x.id);
  }
};

void fill_fallback(Bpe& m) {
  m.fallback_ids.fill(-1);
  char buf[8];
  for (int b = 0; b < 256; ++b) {
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    m.fallback_ids[b] = m.vocab_orig.get(buf);
  }
}

std::unique_ptr<Model> make_bpe(const json& j, const std::string& where, bool byte_level_input) {
  auto m = std::make_unique<Bpe>();
  const JsonObj o{j, cat(where, ": model")};
  const json& vocab = o.at("vocab");
  KILN_CHECK(vocab.is_object(), where, ": model.vocab must be an object");
  m->vocab_orig.reserve(vocab.size());
  int32_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it)
    max_id = std::max(max_id, file_token_id(*it, cat(where, ": model.vocab[\"", it.key(), "\"]")));
  m->id_to_tok.resize(size_t(max_id) + 1);
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const int32_t id = it->get<int32_t>();  // checked above
    m->vocab_orig.put(it.key(), id);
    m->id_to_tok[id] = it.key();
  }
  m->n_tokens = vocab.size();
  m->byte_fallback = o.boolean("byte_fallback", false);
  m->fuse_unk = o.boolean("fuse_unk", false);
  m->ignore_merges = o.boolean("ignore_merges", false);
  m->prefix = o.str("continuing_subword_prefix", "");
  m->suffix = o.str("end_of_word_suffix", "");
  if (const json* dropout = o.find("dropout")) {
    double d = json_number(*dropout, o.field("dropout"));
    KILN_CHECK(d == 0.0, where, ": BPE dropout is not supported (encoding would be random)");
  }
  std::string unk = o.str("unk_token", "");
  if (!unk.empty()) {
    m->unk_id = m->vocab_orig.get(unk);
    KILN_CHECK(m->unk_id >= 0, where, ": model.unk_token \"", unk, "\" is not in the vocab");
  }
  fill_fallback(*m);

  m->raw = byte_level_input && m->prefix.empty() && m->suffix.empty();
  if (m->raw) {
    // Re-key the vocab by raw bytes; tokens with chars outside GPT-2's byte alphabet can never
    // come out of a ByteLevel pre-tokenizer, so they are simply not reachable here.
    m->vocab.reserve(vocab.size());
    std::string raw;
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      const std::string& t = it.key();
      raw.clear();
      bool ok = true;
      for (size_t i = 0; i < t.size() && ok;) {
        int b = char_to_byte(next_cp(t, i));
        if (b < 0)
          ok = false;
        else
          raw.push_back(static_cast<char>(b));
      }
      if (ok) m->vocab.put(raw, it->get<int32_t>(), false);
    }
    for (int b = 0; b < 256; ++b) {
      std::string c;
      append_utf8(c, bytes_to_chars()[b]);
      m->byte_ids[b] = m->vocab_orig.get(c);
    }
  } else {
    m->vocab = m->vocab_orig;
  }

  const json& merges = o.at("merges");
  KILN_CHECK(merges.is_array(), where, ": model.merges must be an array");
  m->merges.reserve(merges.size());
  std::string a, b, joined;
  for (size_t r = 0; r < merges.size(); ++r) {
    const json& e = merges[r];
    if (e.is_string()) {
      const std::string& s = e.get_ref<const std::string&>();
      size_t sp = s.find(' ');
      KILN_CHECK(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos, where,
                 ": model.merges[", r, "] \"", s, "\" is not two tokens separated by a space");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      KILN_CHECK(e.is_array() && e.size() == 2, where, ": model.merges[", r,
                 "] must be \"a b\" or [\"a\", \"b\"]");
      a = json_string(e[0], o.field(cat("merges[", r, "][0]")));
      b = json_string(e[1], o.field(cat("merges[", r, "][1]")));
    }
    int32_t ia = m->vocab_orig.get(a), ib = m->vocab_orig.get(b);
    KILN_CHECK(ia >= 0, where, ": model.merges[", r, "] token \"", a, "\" is not in the vocab");
    KILN_CHECK(ib >= 0, where, ": model.merges[", r, "] token \"", b, "\" is not in the vocab");
    joined = a;
    joined.append(b, std::min(m->prefix.size(), b.size()));
    int32_t in = m->vocab_orig.get(joined);
    KILN_CHECK(in >= 0, where, ": model.merges[", r, "] result \"", joined,
               "\" is not in the vocab");
    m->merges.put(pair_key(ia, ib), (static_cast<uint64_t>(r) << 32) | static_cast<uint32_t>(in));
  }
  return m;
}

// ---- Unigram -----------------------------------------------------------------------------------

class Unigram : public Model {
 public:
  Unigram(std::vector<std::string> pieces, std::vector<double> scores, std::optional<int> unk,
          bool byte_fallback)
      : pieces_(std::move(pieces)), scores_(std::move(scores)), byte_fallback_(byte_fallback) {
    unk_id_ = unk ? *unk : -1;
    vocab_.reserve(pieces_.size());
    min_score_ = INFINITY;
    for (size_t i = 0; i < pieces_.size(); ++i) {
      vocab_.put(pieces_[i], static_cast<int32_t>(i), false);
      min_score_ = std::min(min_score_, scores_[i]);
      insert_trie(pieces_[i], static_cast<int32_t>(i));
    }
    fallback_.fill(-1);
    char buf[8];
    for (int b = 0; b < 256; ++b) {
      std::snprintf(buf, sizeof buf, "<0x%02X>", b);
      fallback_[b] = vocab_.get(buf);
    }
  }

  std::optional<int32_t> token_to_id(std::string_view t) const override {
    int32_t id = vocab_.get(t);
    if (id < 0) return std::nullopt;
    return id;
  }
  const std::string* id_to_token(int32_t id) const override {
    if (id < 0 || static_cast<size_t>(id) >= pieces_.size()) return nullptr;
    return &pieces_[id];
  }
  size_t vocab_size() const override { return pieces_.size(); }

  // HF's Unigram::encode_optimized (SentencePiece's Viterbi), then ids with byte fallback.
  void encode(std::string_view s, std::vector<int32_t>& out) const override {
    if (s.empty()) return;
    KILN_CHECK(unk_id_ >= 0, "tokenizer: Unigram model has no unk_id but the input needs it");
    size_t n = s.size();
    struct Node {
      int32_t id = -1;
      double score = 0;
      int64_t start = -1;
    };
    std::vector<Node> best(n + 1);
    const double unk_score = min_score_ - 10.0;
    for (size_t at = 0; at < n;) {
      double here = best[at].score;
      // Not utf8_len: a piece that ends mid-character leaves at + utf8_len past the end of `best`.
      size_t mblen = utf8_char_len(s, at);
      bool has_single = false;
      int node = 0;
      for (size_t k = at; k < n; ++k) {
        const uint64_t* nx =
            trie_.get((static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(s[k]));
        if (!nx) break;
        node = static_cast<int>(*nx);
        int32_t id = trie_value_[node];
        if (id < 0) continue;
        size_t end = k + 1;
        double cand = scores_[id] + here;
        Node& t = best[end];
        if (t.start < 0 || cand > t.score) t = Node{id, cand, static_cast<int64_t>(at)};
        if (end - at == mblen) has_single = true;
      }
      if (!has_single) {
        Node& t = best[at + mblen];
        double cand = unk_score + here;
        if (t.start < 0 || cand > t.score) t = Node{unk_id_, cand, static_cast<int64_t>(at)};
      }
      at += mblen;
    }
    // Backtrack; consecutive unknown pieces are fused (HF's fuse_unk is always on for Unigram).
    thread_local std::vector<std::pair<size_t, size_t>> spans;
    spans.clear();
    size_t unk_lo = SIZE_MAX, unk_hi = 0;
    for (size_t end = n; end > 0;) {
      const Node& nd = best[end];
      auto st = static_cast<size_t>(nd.start);
      if (nd.id == unk_id_) {
        if (unk_lo == SIZE_MAX) unk_hi = end;
        unk_lo = st;
      } else {
        if (unk_lo != SIZE_MAX) spans.emplace_back(unk_lo, unk_hi);
        unk_lo = SIZE_MAX;
        spans.emplace_back(st, end);
      }
      end = st;
    }
    if (unk_lo != SIZE_MAX) spans.emplace_back(unk_lo, unk_hi);
    for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
      std::string_view piece = s.substr(it->first, it->second - it->first);
      int32_t id = vocab_.get(piece);
      if (id >= 0) {
        out.push_back(id);
        continue;
      }
      if (byte_fallback_) {
        bool ok = true;
        for (unsigned char c : piece) ok = ok && fallback_[c] >= 0;
        if (ok) {
          for (unsigned char c : piece) out.push_back(fallback_[c]);
          continue;
        }
      }
      out.push_back(unk_id_);
    }
  }

 private:
  void insert_trie(const std::string& p, int32_t id) {
    if (trie_value_.empty()) trie_value_.push_back(-1);
    int node = 0;
    for (unsigned char c : p) {
      uint64_t key = (static_cast<uint64_t>(node) << 8) | c;
      auto found = trie_map_.find(key);
      if (found != trie_map_.end()) {
        node = static_cast<int>(found->second);
      } else {
        int nn = static_cast<int>(trie_value_.size());
        trie_value_.push_back(-1);
        trie_map_[key] = nn;
        node = nn;
      }
    }
    if (trie_value_[node] < 0) trie_value_[node] = id;
  }

 public:
  void finish() {
    trie_.reserve(trie_map_.size());
    for (auto& [k, v] : trie_map_) trie_.put(k, v);
    trie_map_.clear();
  }

 private:
  std::vector<std::string> pieces_;
  std::vector<double> scores_;
  bool byte_fallback_;
  int32_t unk_id_;
  double min_score_;
  StrMap vocab_;
  std::array<int32_t, 256> fallback_{};
  std::unordered_map<uint64_t, uint64_t> trie_map_;
  U64Map trie_;
  std::vector<int32_t> trie_value_;
};

}  // namespace

std::unique_ptr<Model> make_unigram(std::vector<std::string> pieces, std::vector<double> scores,
                                    std::optional<int> unk_id, bool byte_fallback) {
  auto u = std::make_unique<Unigram>(std::move(pieces), std::move(scores), unk_id, byte_fallback);
  u->finish();
  return u;
}

std::unique_ptr<Model> make_spm_bpe(const std::vector<std::string>& pieces,
                                    const std::vector<float>& scores,
                                    const std::vector<bool>& mergeable, int unk_id,
                                    bool byte_fallback) {
  // SentencePiece BPE merges the adjacent pair whose concatenation is the highest-scoring piece
  // (leftmost on ties). Every way of splitting a piece into two pieces becomes a merge ranked by
  // that score, so the generic BPE loop reproduces it.
  auto m = std::make_unique<Bpe>();
  m->id_to_tok.resize(pieces.size());
  m->vocab_orig.reserve(pieces.size());
  for (size_t i = 0; i < pieces.size(); ++i) {
    m->id_to_tok[i] = pieces[i];
    m->vocab_orig.put(pieces[i], static_cast<int32_t>(i), false);
  }
  m->n_tokens = pieces.size();
  m->vocab = m->vocab_orig;
  m->byte_fallback = byte_fallback;
  m->unk_id = unk_id;
  m->fuse_unk = false;
  fill_fallback(*m);
  // Dense rank by descending score; equal scores share a rank so position breaks the tie.
  std::vector<float> sorted(scores);
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  size_t total = 0;
  for (auto& p : pieces) total += p.size();
  m->merges.reserve(total);
  for (size_t i = 0; i < pieces.size(); ++i) {
    const std::string& p = pieces[i];
    if (!mergeable[i] || p.empty()) continue;
    int32_t rank = static_cast<int32_t>(
        std::lower_bound(sorted.begin(), sorted.end(), scores[i], std::greater<float>()) -
        sorted.begin());
    for (size_t k = utf8_len(static_cast<unsigned char>(p[0])); k < p.size();
         k += utf8_len(static_cast<unsigned char>(p[k]))) {
      int32_t a = m->vocab_orig.get(std::string_view(p).substr(0, k));
      int32_t b = m->vocab_orig.get(std::string_view(p).substr(k));
      if (a < 0 || b < 0) continue;
      m->merges.put(pair_key(a, b), (static_cast<uint64_t>(rank) << 32) | static_cast<uint32_t>(i));
    }
  }
  return m;
}

std::unique_ptr<Model> make_model(const json& j, const std::string& where, bool byte_level_input) {
  KILN_CHECK(j.is_object(), where, ": \"model\" must be an object");
  const JsonObj o{j, cat(where, ": model")};
  std::string t = o.str("type", "");
  if (t.empty()) {
    // Old files omit the type; HF infers it from the fields.
    if (j.contains("merges"))
      t = "BPE";
    else if (j.contains("vocab") && j["vocab"].is_array())
      t = "Unigram";
  }
  if (t == "BPE") return make_bpe(j, where, byte_level_input);
  if (t == "Unigram") {
    const json& v = o.at("vocab");
    KILN_CHECK(v.is_array(), where, ": Unigram model.vocab must be an array of [piece, score]");
    std::vector<std::string> pieces;
    std::vector<double> scores;
    pieces.reserve(v.size());
    scores.reserve(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      KILN_CHECK(v[i].is_array() && v[i].size() == 2, where, ": model.vocab[", i,
                 "] must be [piece, score]");
      pieces.push_back(json_string(v[i][0], o.field(cat("vocab[", i, "][0]"))));
      scores.push_back(json_number(v[i][1], o.field(cat("vocab[", i, "][1]"))));
    }
    std::optional<int> unk;
    if (j.contains("unk_id") && !j["unk_id"].is_null()) {
      unk = file_token_id(j["unk_id"], cat(where, ": model.unk_id"));
      KILN_CHECK(*unk >= 0 && static_cast<size_t>(*unk) < pieces.size(), where,
                 ": model.unk_id out of range");
    }
    return make_unigram(std::move(pieces), std::move(scores), unk,
                        o.boolean("byte_fallback", false));
  }
  throw Error(cat(where, ": unsupported model type \"", t, "\""));
}

}  // namespace kiln::tok
