// GGUF reader: bit-exact dequantization of every supported ggml type against gguf-py (fixtures
// made by tests/fixtures/make_gguf_fixtures.py), metadata of every value type, one-line errors
// for corrupt headers (patched bytes, every truncation), and the two real checkpoints in
// /work/gguf when present.
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <set>

#include "core/error.h"
#include "io/gguf.h"
#include "test_util.h"

namespace kiln::test {
namespace {

fs::path quants() {
  return data("gguf/quants.gguf");
}

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

TEST(Gguf, DequantizesEveryTypeBitExactlyAsGgufPy) {
  auto f = GgufFile::open(quants());
  auto expected = SafetensorsFile::open(data("gguf/quants_expected.safetensors"));
  EXPECT_EQ(f->version(), 3u);
  ASSERT_EQ(f->tensors().size(), 14u);
  ASSERT_EQ(expected->tensors().size(), 14u);
  std::set<GgmlType> types;
  for (const auto& t : f->tensors()) {
    SCOPED_TRACE(t.name);
    types.insert(t.type);
    EXPECT_EQ(
        t.name, t.name == "q8_0_3d" ? "q8_0_3d" : [&] {
          std::string n = ggml_type_name(uint32_t(t.type));
          for (auto& c : n) c = char(std::tolower(c));
          return n;
        }());
    Tensor want = expected->get(t.name);
    Tensor got = f->to_f32(t);
    ASSERT_EQ(got.dtype, DType::F32);
    ASSERT_EQ(got.shape, want.shape);
    ASSERT_EQ(got.shape, t.shape());
    int mismatches = 0;
    for (int64_t i = 0; i < got.numel(); ++i) {
      if (bits(got.ptr<float>()[i]) != bits(want.ptr<float>()[i]) && ++mismatches <= 5)
        ADD_FAILURE() << t.name << "[" << i << "]: " << got.ptr<float>()[i] << " vs "
                      << want.ptr<float>()[i];
    }
    EXPECT_EQ(mismatches, 0);
    // The same through ggml_dequantize on the whole tensor at once.
    std::vector<float> all(size_t(t.numel()));
    ggml_dequantize(t.type, f->data(t), all.data(), t.numel());
    EXPECT_EQ(std::memcmp(all.data(), got.data, all.size() * 4), 0);
    EXPECT_EQ(t.nbytes, size_t(t.numel() / ggml_block_elems(t.type)) * ggml_block_bytes(t.type));
    EXPECT_EQ(t.offset % 64, 0u);  // general.alignment = 64
    EXPECT_EQ(f->find(t.name), &t);
  }
  EXPECT_EQ(types.size(), 13u);
  EXPECT_EQ(f->find("q8_0_3d")->ne, (std::vector<int64_t>{64, 3, 2}));
  EXPECT_EQ(f->find("q8_0_3d")->shape(), (Shape{2, 3, 64}));
  EXPECT_EQ(f->find("nope"), nullptr);
  f->drop_pages(*f->find("f32"));  // harmless; the data reads the same after
  EXPECT_EQ(bits(f->to_f32(*f->find("f32")).ptr<float>()[0]),
            bits(expected->get("f32").ptr<float>()[0]));
}

TEST(Gguf, TypeTraits) {
  EXPECT_EQ(ggml_type_name(12), "Q4_K");
  EXPECT_EQ(ggml_type_name(30), "BF16");
  EXPECT_EQ(ggml_type_name(16), "IQ2_XXS");
  EXPECT_EQ(ggml_type_name(4), "type 4");  // removed from ggml
  EXPECT_EQ(ggml_type_name(1000), "type 1000");
  for (uint32_t t : {0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30})
    EXPECT_TRUE(ggml_type_supported(t)) << t;
  for (uint32_t t : {4, 9, 15, 16, 23, 24, 28, 39, 43, 1000})
    EXPECT_FALSE(ggml_type_supported(t)) << t;
  EXPECT_EQ(ggml_block_elems(GgmlType::Q4_K), 256);
  EXPECT_EQ(ggml_block_bytes(GgmlType::Q4_K), 144u);
  EXPECT_EQ(ggml_block_elems(GgmlType::Q5_1), 32);
  EXPECT_EQ(ggml_block_bytes(GgmlType::Q5_1), 24u);
  EXPECT_EQ(ggml_block_bytes(GgmlType::BF16), 2u);
  EXPECT_TRUE(contains_text(one_line_error([] { ggml_block_bytes(GgmlType::Q8_K); }),
                            "Q8_K is not supported"));
  float y[32];
  const uint8_t z[34] = {};
  EXPECT_TRUE(contains_text(one_line_error([&] { ggml_dequantize(GgmlType::Q8_0, z, y, 31); }),
                            "whole number"));
}

TEST(Gguf, MetadataValuesAndTypes) {
  auto f = GgufFile::open(quants());
  const auto& m = f->metadata();
  ASSERT_TRUE(m.is_object());
  EXPECT_EQ(m.at("general.architecture"), "kiln-test");
  EXPECT_TRUE(m.at("general.alignment").is_number_unsigned());
  EXPECT_EQ(m.at("general.alignment").get<uint32_t>(), 64u);
  EXPECT_FALSE(m.at("kiln.fixture.gguf_py_version").get<std::string>().empty());
  // Unsigned integers are JSON unsigned numbers, signed ones signed, extremes kept.
  for (const char* k : {"test.u8", "test.u16", "test.u32", "test.u64"})
    EXPECT_TRUE(m.at(k).is_number_unsigned()) << k;
  for (const char* k : {"test.i8", "test.i16", "test.i32", "test.i64"})
    EXPECT_TRUE(m.at(k).is_number_integer() && !m.at(k).is_number_unsigned()) << k;
  EXPECT_EQ(m.at("test.u8").get<uint64_t>(), 255u);
  EXPECT_EQ(m.at("test.i8").get<int64_t>(), -128);
  EXPECT_EQ(m.at("test.u16").get<uint64_t>(), 65535u);
  EXPECT_EQ(m.at("test.i16").get<int64_t>(), -32768);
  EXPECT_EQ(m.at("test.u32").get<uint64_t>(), 4294967295u);
  EXPECT_EQ(m.at("test.i32").get<int64_t>(), -2147483648ll);
  EXPECT_EQ(m.at("test.u64").get<uint64_t>(), 18446744073709551615ull);
  EXPECT_EQ(m.at("test.i64").get<int64_t>(), std::numeric_limits<int64_t>::min());
  ASSERT_TRUE(m.at("test.f32").is_number_float());
  EXPECT_EQ(m.at("test.f32").get<double>(), double(0.1f));  // the float32, widened exactly
  EXPECT_EQ(m.at("test.f64").get<double>(), 0.1);
  EXPECT_EQ(m.at("test.true"), true);
  EXPECT_EQ(m.at("test.false"), false);
  EXPECT_EQ(m.at("test.string").get<std::string>(), "h\xc3\xa9llo w\xc3\xb6rld");
  // Not UTF-8, with a NUL: byte for byte.
  EXPECT_EQ(m.at("test.bytes").get<std::string>(), std::string("\xff\xfe\0x", 4));
  EXPECT_EQ(m.at("test.array_i32"), nlohmann::json({1, -2, 3}));
  EXPECT_TRUE(m.at("test.array_i32")[0].is_number_integer());
  EXPECT_EQ(m.at("test.array_f32"), nlohmann::json({0.5, -1.25}));
  EXPECT_EQ(m.at("test.array_bool"), nlohmann::json({true, false, true}));
  EXPECT_EQ(m.at("test.array_str"), nlohmann::json({"a", "", "\xc3\xbc", "<s>"}));
  EXPECT_EQ(m.at("test.array_nested"), nlohmann::json::parse("[[[1,2],[3]],[[4]]]"));
  EXPECT_NE(f->header_hash(), 0u);
  EXPECT_EQ(f->header_hash(), GgufFile::open(quants())->header_hash());
}

TEST(Gguf, IsGgufFile) {
  TempDir tmp;
  EXPECT_TRUE(is_gguf_file(quants()));
  EXPECT_FALSE(is_gguf_file(data("gguf/quants_expected.safetensors")));
  EXPECT_FALSE(is_gguf_file(tmp.path));  // a folder
  EXPECT_FALSE(is_gguf_file(tmp / "missing.gguf"));
  write_text(tmp / "short", "GGU");
  EXPECT_FALSE(is_gguf_file(tmp / "short"));
  write_text(tmp / "magic", "GGUF");
  EXPECT_TRUE(is_gguf_file(tmp / "magic"));
}

// A GGUF file built field by field; `at` records where each named field starts, for patching.
struct Builder {
  std::string b;
  std::map<std::string, size_t> at;
  void mark(const std::string& field) {
    if (!field.empty()) at[field] = b.size();
  }
  void raw(const void* p, size_t n) { b.append(static_cast<const char*>(p), n); }
  void u8(uint8_t v, const std::string& field = "") { mark(field), raw(&v, 1); }
  void u32(uint32_t v, const std::string& field = "") { mark(field), raw(&v, 4); }
  void u64(uint64_t v, const std::string& field = "") { mark(field), raw(&v, 8); }
  void str(const std::string& s, const std::string& field = "") {
    u64(s.size(), field);
    b += s;
  }
  void pad(size_t alignment) {
    while (b.size() % alignment) b += '\0';
  }
  template <typename T>
  void patch(const std::string& field, T v) {
    ASSERT_TRUE(at.count(field)) << field;
    std::memcpy(&b[at.at(field)], &v, sizeof v);
  }
};

// A small valid file: 6 keys (of types string, uint32, array of int32, array of strings, float32,
// uint8) and 2 tensors, a Q8_0 [2, 64] at offset 0 (136 bytes) and an F32 [8] at offset 160.
Builder small_file() {
  Builder g;
  g.raw("GGUF", 4);
  g.u32(3, "version");
  g.u64(2, "tensor_count");
  g.u64(6, "kv_count");
  g.str("general.architecture", "key0");
  g.u32(8, "key0.type");
  g.str("llama");
  g.str("general.alignment", "key1");
  g.u32(4, "alignment.type");
  g.u32(32, "alignment");
  g.str("test.ints", "key2");
  g.u32(9, "ints.type");
  g.u32(5, "ints.elem_type");
  g.u64(3, "ints.count");
  for (uint32_t v : {1u, 2u, 3u}) g.u32(v);
  g.str("test.strs", "key3");
  g.u32(9);
  g.u32(8);
  g.u64(2, "strs.count");
  g.str("ab", "strs.0");
  g.str("c");
  g.str("test.f", "key4");
  g.u32(6);
  float x = 1.5f;
  g.raw(&x, 4);
  g.str("test.u", "key5");
  g.u32(0);
  g.u8(7);
  g.str("a.weight", "a.name");
  g.u32(2, "a.n_dims");
  g.u64(64, "a.ne0");
  g.u64(2, "a.ne1");
  g.u32(8, "a.type");  // Q8_0
  g.u64(0, "a.offset");
  g.str("b.weight", "b.name");
  g.u32(1, "b.n_dims");
  g.u64(8, "b.ne0");
  g.u32(0, "b.type");  // F32
  g.u64(160, "b.offset");
  g.mark("header_end");
  g.pad(32);
  g.mark("data");
  // a: 4 Q8_0 blocks, d = 1.0 (fp16 0x3c00), q = -16..15; then padding; b: 0.5 * i.
  for (int blk = 0; blk < 4; ++blk) {
    g.u8(0x00), g.u8(0x3c);
    for (int i = 0; i < 32; ++i) g.u8(uint8_t(int8_t(i - 16)));
  }
  g.pad(32);
  for (int i = 0; i < 8; ++i) {
    float v = 0.5f * float(i);
    g.raw(&v, 4);
  }
  return g;
}

TEST(Gguf, SmallFileReadsBack) {
  TempDir tmp;
  Builder g = small_file();
  write_text(tmp / "s.gguf", g.b);
  auto f = GgufFile::open(tmp / "s.gguf");
  EXPECT_EQ(f->metadata().at("general.architecture"), "llama");
  EXPECT_EQ(f->metadata().at("test.ints"), nlohmann::json({1, 2, 3}));
  EXPECT_EQ(f->metadata().at("test.strs"), nlohmann::json({"ab", "c"}));
  EXPECT_EQ(f->metadata().at("test.f"), 1.5);
  ASSERT_EQ(f->tensors().size(), 2u);
  const auto& a = f->tensors()[0];
  EXPECT_EQ(a.name, "a.weight");
  EXPECT_EQ(a.type, GgmlType::Q8_0);
  EXPECT_EQ(a.shape(), (Shape{2, 64}));
  EXPECT_EQ(a.nbytes, 136u);
  EXPECT_EQ(f->data(a), f->data(f->tensors()[1]) - 160);
  Tensor ta = f->to_f32(a);
  for (int i = 0; i < 128; ++i) EXPECT_EQ(ta.ptr<float>()[i], float(i % 32 - 16)) << i;
  Tensor tb = f->to_f32(*f->find("b.weight"));
  EXPECT_EQ(tb.shape, (Shape{8}));
  for (int i = 0; i < 8; ++i) EXPECT_EQ(tb.ptr<float>()[i], 0.5f * float(i));
  // Version 2 reads the same.
  g.patch("version", uint32_t(2));
  write_text(tmp / "s.gguf", g.b);
  EXPECT_EQ(GgufFile::open(tmp / "s.gguf")->version(), 2u);
}

TEST(Gguf, EmptyDimensionIsAllowedAsInLlamaCpp) {
  // llama.cpp accepts a dimension of 0 (an empty tensor); so does kiln: 0 bytes, 0 elements.
  TempDir tmp;
  Builder g = small_file();
  g.patch("a.ne1", uint64_t(0));
  write_text(tmp / "e.gguf", g.b);
  auto f = GgufFile::open(tmp / "e.gguf");
  const auto& a = *f->find("a.weight");
  EXPECT_EQ(a.nbytes, 0u);
  EXPECT_EQ(a.numel(), 0);
  Tensor t = f->to_f32(a);
  EXPECT_EQ(t.shape, (Shape{0, 64}));
  EXPECT_EQ(t.numel(), 0);
  // An empty tensor overlaps nothing, even where another tensor's bytes are.
  g.patch("b.offset", uint64_t(0));
  write_text(tmp / "e.gguf", g.b);
  EXPECT_NO_THROW(GgufFile::open(tmp / "e.gguf"));
}

TEST(Gguf, CorruptHeadersGiveOneLineErrors) {
  TempDir tmp;
  const fs::path p = tmp / "bad.gguf";
  struct Case {
    std::string what;
    std::function<void(Builder&)> corrupt;
    std::string expect;
  };
  const uint64_t huge = uint64_t(1) << 63;
  const std::vector<Case> cases = {
      {"bad magic", [](Builder& g) { g.b[0] = 'X'; }, "not a GGUF file (starts with 'XGUF'"},
      {"version 1", [](Builder& g) { g.patch("version", uint32_t(1)); },
       "GGUF version 1 is not supported"},
      {"version 4", [](Builder& g) { g.patch("version", uint32_t(4)); },
       "GGUF version 4 is not supported"},
      {"big-endian version", [](Builder& g) { g.patch("version", uint32_t(3) << 24); },
       "big-endian"},
      {"huge tensor_count", [&](Builder& g) { g.patch("tensor_count", huge); },
       "tensor_count 9223372036854775808 is more than"},
      {"huge kv_count", [&](Builder& g) { g.patch("kv_count", huge); },
       "kv_count 9223372036854775808 is more than"},
      {"huge key length", [&](Builder& g) { g.patch("key0", huge); },
       "key #0: key length 9223372036854775808 exceeds the"},
      {"huge string value length", [&](Builder& g) { g.patch("strs.0", huge); },
       "key 'test.strs': string length 9223372036854775808 exceeds"},
      {"huge array length", [&](Builder& g) { g.patch("ints.count", huge); },
       "key 'test.ints': array length 9223372036854775808 of int32 exceeds"},
      {"array length just too long", [&](Builder& g) { g.patch("strs.count", uint64_t(1) << 40); },
       "key 'test.strs': array length 1099511627776 of string exceeds"},
      {"unknown value type", [](Builder& g) { g.patch("key0.type", uint32_t(13)); },
       "key 'general.architecture': unknown value type 13"},
      {"unknown array element type", [](Builder& g) { g.patch("ints.elem_type", uint32_t(77)); },
       "key 'test.ints': unknown array element type 77"},
      {"empty key", [](Builder& g) { g.patch("key0", uint64_t(0)); }, "key #0: empty key"},
      {"duplicate key", [](Builder& g) { std::memcpy(&g.b[g.at["key5"] + 8], "test.f", 6); },
       "key 'test.f': duplicate key"},
      {"alignment not a power of two", [](Builder& g) { g.patch("alignment", uint32_t(48)); },
       "key 'general.alignment': alignment 48 is not a power of two"},
      {"alignment 0", [](Builder& g) { g.patch("alignment", uint32_t(0)); },
       "alignment 0 is not a power of two"},
      {"alignment of type int32", [](Builder& g) { g.patch("alignment.type", uint32_t(5)); },
       "key 'general.alignment': must be of type uint32, not int32"},
      {"unsupported tensor type", [](Builder& g) { g.patch("a.type", uint32_t(16)); },
       "tensor 'a.weight': ggml type IQ2_XXS is not supported (kiln reads F32, F16, BF16, Q4_0, "
       "Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"},
      {"Q8_K", [](Builder& g) { g.patch("a.type", uint32_t(15)); },
       "tensor 'a.weight': ggml type Q8_K is not supported"},
      {"unknown tensor type", [](Builder& g) { g.patch("a.type", uint32_t(99)); },
       "tensor 'a.weight': unknown ggml type 99 (kiln reads F32"},
      {"removed tensor type", [](Builder& g) { g.patch("a.type", uint32_t(4)); },
       "tensor 'a.weight': unknown ggml type 4"},
      {"n_dims 0", [](Builder& g) { g.patch("a.n_dims", uint32_t(0)); },
       "tensor 'a.weight': n_dims 0 is not in 1..4"},
      {"n_dims 5", [](Builder& g) { g.patch("a.n_dims", uint32_t(5)); }, "n_dims 5 is not in 1..4"},
      {"ne[0] not a multiple of the block", [](Builder& g) { g.patch("a.ne0", uint64_t(48)); },
       "tensor 'a.weight': ne [48, 2]: ne[0] = 48 is not a multiple of the Q8_0 block size 32"},
      {"negative dimension", [](Builder& g) { g.patch("a.ne1", uint64_t(-2)); },
       "tensor 'a.weight': dimension 1 (18446744073709551614) makes the element count overflow"},
      {"element count overflow", [](Builder& g) { g.patch("a.ne1", uint64_t(1) << 60); },
       "dimension 1 (1152921504606846976) makes the element count overflow"},
      {"byte size overflow",
       [](Builder& g) {
         g.patch("b.ne0", uint64_t(1) << 61);  // F32: 2^63 bytes
       },
       "tensor 'b.weight': ne [2305843009213693952]: the size in bytes overflows"},
      {"offset misaligned", [](Builder& g) { g.patch("b.offset", uint64_t(161)); },
       "tensor 'b.weight': data offset 161 is not a multiple of the alignment 32"},
      {"tensor past the end", [](Builder& g) { g.patch("b.offset", uint64_t(192)); },
       "tensor 'b.weight': its 32 bytes at offset 192 are past the end of the data area (192 "
       "bytes)"},
      {"tensor offset near 2^64", [](Builder& g) { g.patch("b.offset", uint64_t(-32)); },
       "past the end of the data area"},
      {"overlapping tensors", [](Builder& g) { g.patch("b.offset", uint64_t(128)); },
       "tensors 'a.weight' and 'b.weight' overlap"},
      {"duplicate tensor name", [](Builder& g) { g.b[g.at["b.name"] + 8] = 'a'; },
       "tensor 'a.weight': duplicate tensor name"},
      {"empty tensor name", [](Builder& g) { g.patch("a.name", uint64_t(0)); },
       "tensor #0: empty tensor name"},
      {"huge tensor name", [&](Builder& g) { g.patch("b.name", huge); },
       "tensor #1: tensor name length 9223372036854775808 exceeds"},
      {"non-printable name escaped", [](Builder& g) { g.b[g.at["b.name"] + 8] = '\x01'; },
       "tensor '\\x01.weight': data offset"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    Builder g = small_file();
    // Cases past the KV section keep the layout; the non-printable name one also moves b's
    // offset so that it fails somewhere after the name.
    c.corrupt(g);
    if (c.what == "non-printable name escaped") g.patch("b.offset", uint64_t(161));
    write_text(p, g.b);
    const std::string e = one_line_error([&] { GgufFile::open(p); });
    EXPECT_TRUE(contains_text(e, c.expect)) << e;
    EXPECT_TRUE(contains_text(e, p.string())) << e;
  }
}

TEST(Gguf, NestedArraysUpToTheDepthLimit) {
  TempDir tmp;
  // One key holding `depth` nested arrays around a single uint8 7.
  auto file = [&](int depth) {
    Builder g;
    g.raw("GGUF", 4);
    g.u32(3);
    g.u64(0);
    g.u64(1);
    g.str("nested");
    g.u32(9);
    for (int d = 1; d < depth; ++d) g.u32(9), g.u64(1);
    g.u32(0), g.u64(1), g.u8(7);
    write_text(tmp / "n.gguf", g.b);
    return tmp / "n.gguf";
  };
  auto f = GgufFile::open(file(4));
  EXPECT_EQ(f->metadata().at("nested"), nlohmann::json::parse("[[[[7]]]]"));
  EXPECT_TRUE(f->tensors().empty());
  EXPECT_TRUE(contains_text(one_line_error([&] { GgufFile::open(file(5)); }),
                            "key 'nested': arrays nested deeper than 4 levels are not supported"));
}

TEST(Gguf, LongAndBinaryNamesAreEscapedAndCutInErrors) {
  TempDir tmp;
  Builder g = small_file();
  // Replace key 0 by a 300-byte binary key whose type is unknown.
  Builder h;
  h.b = g.b.substr(0, g.at["key0"]);
  std::string key(300, '\x80');
  key[0] = '\n';
  h.str(key);
  h.u32(77);
  write_text(tmp / "k.gguf", h.b);
  const std::string e = one_line_error([&] { GgufFile::open(tmp / "k.gguf"); });
  EXPECT_TRUE(contains_text(e, "key '\\x0a\\x80\\x80")) << e;
  EXPECT_TRUE(contains_text(e, "...' (300 bytes): unknown value type 77")) << e;
  EXPECT_LT(e.size(), 600u);
}

TEST(Gguf, EveryTruncationIsAnError) {
  TempDir tmp;
  const Builder g = small_file();
  const fs::path p = tmp / "t.gguf";
  // Every prefix of the file: inside the header, in the padding, inside each tensor's data.
  for (size_t n = 0; n < g.b.size(); ++n) {
    SCOPED_TRACE(n);
    write_text(p, g.b.substr(0, n));
    const std::string e = one_line_error([&] { GgufFile::open(p); });
    EXPECT_TRUE(contains_text(e, "truncated")) << e;
  }
  write_text(p, g.b);
  EXPECT_NO_THROW(GgufFile::open(p));
  // A file with no tensors may end right after its header (no padding), as llama.cpp allows.
  Builder h;
  h.raw("GGUF", 4);
  h.u32(3);
  h.u64(0);
  h.u64(1);
  h.str("k");
  h.u32(7);
  h.u8(1);
  write_text(p, h.b);
  EXPECT_EQ(GgufFile::open(p)->metadata().at("k"), true);
}

TEST(Gguf, TruncatedFixtureIsAnError) {
  // Prefixes of the gguf-py-written fixture: through its header (strings, arrays, the nested
  // array, tensor infos) every 7th length, then cuts inside its data area up to the last byte of
  // its last tensor (the padding after it may go).
  TempDir tmp;
  std::ifstream in(quants(), std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto f = GgufFile::open(quants());
  const size_t data_start = 1664;  // the header's end padded to 64, as gguf-py reports it
  const GgufTensorInfo& first = f->tensors()[0];
  const GgufTensorInfo& last = f->tensors().back();
  ASSERT_EQ(first.offset, 0u);
  ASSERT_EQ(std::memcmp(all.data() + data_start, f->data(first), first.nbytes), 0);
  const size_t end = data_start + last.offset + last.nbytes;
  ASSERT_LE(end, all.size());
  std::vector<size_t> cuts;
  for (size_t n = 0; n < data_start; n += 7) cuts.push_back(n);
  for (size_t n = data_start; n < end; n += 97) cuts.push_back(n);
  cuts.push_back(end - 1);
  const fs::path p = tmp / "t.gguf";
  for (size_t n : cuts) {
    SCOPED_TRACE(n);
    write_text(p, all.substr(0, n));
    const std::string e = one_line_error([&] { GgufFile::open(p); });
    EXPECT_TRUE(contains_text(e, "truncated")) << e;
  }
  write_text(p, all.substr(0, end));
  EXPECT_NO_THROW(GgufFile::open(p));
}

TEST(Gguf, RandomCorruptionsNeverCrash) {
  // Random bytes of the small file and of the fixture's header overwritten: each open either
  // succeeds (then every tensor dequantizes) or throws kiln::Error, nothing else (no bad_alloc).
  TempDir tmp;
  const fs::path p = tmp / "r.gguf";
  std::ifstream in(quants(), std::ios::binary);
  const std::string fixture((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string files[2] = {small_file().b, fixture.substr(0, 1664 + 512)};
  uint64_t rng = 0x9e3779b97f4a7c15ull;
  auto next = [&rng] {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return rng;
  };
  int opened = 0, errors = 0;
  for (int it = 0; it < 600; ++it) {
    std::string b = files[it % 2];
    const size_t header = it % 2 ? 1664 : 300;
    for (int k = 0, n = 1 + int(next() % 4); k < n; ++k) {
      const size_t at = size_t(next() % header);
      b[at] = next() % 3 == 0 ? char(0xff) : char(next());
    }
    write_text(p, b);
    try {
      auto f = GgufFile::open(p);
      for (const auto& t : f->tensors()) f->to_f32(t);
      ++opened;
    } catch (const Error&) {
      ++errors;
    }
  }
  EXPECT_GT(errors, 0);
  EXPECT_GT(opened, 0);
}

TEST(Gguf, MissingFile) {
  EXPECT_TRUE(
      contains_text(one_line_error([] { GgufFile::open("/nonexistent/x.gguf"); }), "cannot open"));
}

// The real checkpoints (not committed: large). Checks the architecture, the tensor count, the
// vocabulary, and blk.0.attn_q.weight against values gguf-py's dequantize gives.
struct RealFile {
  const char* path;
  const char* arch;
  size_t tensors;
  size_t tokens, merges;
  GgmlType q_type;
  Shape q_shape;
  std::vector<std::pair<int64_t, float>> q_values;  // (flat index, gguf-py's value)
};

void check_real(const RealFile& r) {
  if (!fs::exists(r.path)) GTEST_SKIP() << r.path << " not present";
  const auto t0 = std::chrono::steady_clock::now();
  auto f = GgufFile::open(r.path);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("  %s: opened in %.3f s\n", r.path, s);
  EXPECT_LT(s, 10.0);
  EXPECT_EQ(f->metadata().at("general.architecture"), r.arch);
  EXPECT_EQ(f->tensors().size(), r.tensors);
  EXPECT_EQ(f->metadata().at("tokenizer.ggml.tokens").size(), r.tokens);
  if (r.merges) {
    EXPECT_EQ(f->metadata().at("tokenizer.ggml.merges").size(), r.merges);
  }
  EXPECT_TRUE(is_gguf_file(r.path));
  const GgufTensorInfo* q = f->find("blk.0.attn_q.weight");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->type, r.q_type);
  EXPECT_EQ(q->shape(), r.q_shape);
  Tensor t = f->to_f32(*q);
  EXPECT_EQ(t.shape, r.q_shape);
  for (int64_t i = 0; i < t.numel(); ++i) ASSERT_TRUE(std::isfinite(t.ptr<float>()[i])) << i;
  for (const auto& [i, v] : r.q_values) EXPECT_EQ(bits(t.ptr<float>()[i]), bits(v)) << i;
  f->drop_pages(*q);
}

TEST(Gguf, RealSmolLM2) {
  check_real({"/work/gguf/SmolLM2-135M-Instruct.Q4_1.gguf",
              "llama",
              272,
              49152,
              48900,
              GgmlType::Q4_1,
              {576, 576},
              {{0, -9.631348e-02f},
               {1, 1.5734863e-01f},
               {577, -1.1730957e-01f},
               {12345, 1.2109375e-01f},
               {165895, 1.71875e-01f},
               {331775, -2.5585938e-01f}}});
}

TEST(Gguf, RealGemma3) {
  check_real({"/work/gguf/gemma-3-270m-q4_k_m.gguf",
              "gemma3",
              236,
              262144,
              0,
              GgmlType::Q5_0,
              {1024, 640},
              {{0, -3.7841797e-03f},
               {1, 7.5683594e-03f},
               {577, -1.3244629e-02f},
               {12345, 3.1723022e-02f},
               {327687, 1.7547607e-02f},
               {655359, 1.3122559e-02f}}});
}

}  // namespace
}  // namespace kiln::test
