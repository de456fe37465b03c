// Unit tests of the Jinja interpreter (src/tokenizer/jinja.h). The *.MatchesJinja2 tables hold
// outputs of jinja2 3.1.6 configured like transformers' chat-template environment (the same
// setup tests/chat_template_diff.py uses); the other tests cover errors, options and the sandbox.
#include <gtest/gtest.h>

#include <pthread.h>

#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "tokenizer/jinja.h"

namespace kiln {
namespace {

using ojson = nlohmann::ordered_json;

// The variables every table case renders with (key order matters for dict output).
const char* const kContext = R"json({
 "msgs": [
  {
   "role": "system",
   "content": "Be brief."
  },
  {
   "role": "user",
   "content": "Hi"
  },
  {
   "role": "assistant",
   "content": "Hello!"
  }
 ],
 "d": {
  "b": 1,
  "a": [
   1,
   2
  ],
  "z": null
 },
 "s": "héllo wörld",
 "n": null,
 "nums": [
  3,
  1,
  2
 ],
 "people": [
  {
   "name": "Bo",
   "age": 30
  },
  {
   "name": "al",
   "age": 25
  },
  {
   "name": "Cy"
  }
 ]
})json";

struct Case {
  const char* tmpl;
  const char* expected;
};

void expect_renders(std::initializer_list<Case> cases) {
  const ojson ctx = ojson::parse(kContext);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.tmpl);
    try {
      EXPECT_EQ(JinjaTemplate(c.tmpl).render(ctx), c.expected);
    } catch (const Error& e) {
      ADD_FAILURE() << e.what();
    }
  }
}

std::string render(std::string_view tmpl, const ojson& ctx = ojson::object(),
                   JinjaOptions opts = {}) {
  return JinjaTemplate(tmpl, opts).render(ctx);
}

// The kiln::Error message of parsing + rendering `tmpl`, or "" if it succeeds.
std::string error_of(std::string_view tmpl, const ojson& ctx = ojson::object(),
                     JinjaOptions opts = {}) {
  try {
    JinjaTemplate(tmpl, opts).render(ctx);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Expected outputs below were produced by jinja2 3.1.6 configured as transformers does.
TEST(JinjaLiterals, MatchesJinja2) {
  expect_renders({
      {"{{ \"a\\tb\\n\" }}|{{ 'single' }}|{{ \"\\u00e9\\x41\\101\\d\" }}|{{ \"adj\" \"ac"
       "ent\" }}",
       "a\tb\n|single|éAA\\d|adjacent"},
      {"{{ 42 }} {{ -7 }} {{ 1_000 }} {{ 0x1F }} {{ 0o17 }} {{ 0b101 }}", "42 -7 1000 31 15 5"},
      {"{{ 1.0 }} {{ 1.5e3 }} {{ 1e16 }} {{ 1e15 }} {{ 0.0001 }} {{ 0.00001 }} {{ 0.1 + "
       "0.2 }} {{ 1/3 }} {{ 2.5e-7 }} {{ -0.0 }}",
       "1.0 1500.0 1e+16 1000000000000000.0 0.0001 1e-05 0.30000000000000004 0.333333333"
       "3333333 2.5e-07 -0.0"},
      {"{{ true }} {{ True }} {{ false }} {{ none }} {{ None }}", "True True False None None"},
      {"{{ [1, \"a\", none, true, 1.5] }} {{ {\"k\": (1,), \"e\": ()} }} {{ (1, 2) }} {{"
       " [] }} {{ {} }}",
       "[1, 'a', None, True, 1.5] {'k': (1,), 'e': ()} (1, 2) [] {}"},
      {"{{ [\"it's\", 'say \"hi\"', 'both \\' \"', 'tab\\tnl\\n', 'bs\\\\', '\\x01\\x7f'"
       ", 'é✓'] }}",
       "[\"it's\", 'say \"hi\"', 'both \\' \"', 'tab\\tnl\\n', 'bs\\\\', '\\x01\\x7f', '"
       "é✓']"},
      {"{{ 1, 2 }} {{ (1) }} {{ ((1, 2),) }}", "(1, 2) 1 ((1, 2),)"},
  });
}

TEST(JinjaArithmetic, MatchesJinja2) {
  expect_renders({
      {"{{ 7 + 2 }} {{ 7 - 9 }} {{ 7 * 3 }} {{ 7 / 2 }} {{ 6 / 3 }} {{ 7 // 2 }} {{ -7 /"
       "/ 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 % -3 }}",
       "9 -2 21 3.5 2.0 3 -4 1 2 -2"},
      {"{{ 2 ** 10 }} {{ 2 ** 3 ** 2 }} {{ 2 ** -1 }} {{ -2 ** 2 }} {{ (-2) ** 3 }} {{ 2"
       ".0 ** 0.5 }}",
       "1024 64 0.5 4 -8 1.4142135623730951"},
      {"{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 10 - 2 - 3 }} {{ 2 * 3 % 4 }} {{ 1 + 2.5 }}"
       " {{ true + 1 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }}",
       "7 9 5 2 3.5 2 3.0 0.5"},
      {"{{ \"ab\" + \"cd\" }} {{ [1] + [2, 3] }} {{ (1,) + (2,) }} {{ \"ab\" * 3 }} {{ 2"
       " * \"x\" }} {{ [0] * 3 }} {{ \"x\" * 0 }}",
       "abcd [1, 2, 3] (1, 2) ababab xx [0, 0, 0] "},
      {"{{ \"a\" ~ 1 ~ none ~ true ~ [1] ~ undefined_thing }}|{{ -3 | abs }}|{{ -(3) }}|"
       "{{ +3 }}",
       "a1NoneTrue[1]|3|-3|3"},
      {"{{ 1e300 * 1e10 }} {{ -1e300 * 1e10 }} {{ 9007199254740993 }} {{ 922337203685477"
       "5807 }}",
       "inf -inf 9007199254740993 9223372036854775807"},
  });
}

TEST(JinjaComparison, MatchesJinja2) {
  expect_renders({
      {"{{ 1 == 1.0 }} {{ true == 1 }} {{ \"a\" == \"a\" }} {{ [1, 2] == [1, 2] }} {{ (1"
       ",) == [1] }} {{ {\"a\": 1} == {\"a\": 1} }} {{ none == none }} {{ 1 != 2 }}",
       "True True True True False True True True"},
      {"{{ 1 < 2 }} {{ 2 <= 2 }} {{ 3 > 2 > 1 }} {{ 3 > 2 > 2 }} {{ \"a\" < \"b\" }} {{ "
       "[1, 2] < [1, 3] }} {{ 1.5 >= 1 }}",
       "True True True False True True True"},
      {"{{ \"b\" in \"abc\" }} {{ \"d\" not in \"abc\" }} {{ 2 in [1, 2] }} {{ \"a\" in "
       "{\"a\": 1} }} {{ \"z\" in d }} {{ 1 in (1, 2) }}",
       "True True True True True True"},
      {"{{ not true }} {{ not none }} {{ not [] }} {{ true and 0 }} {{ 0 or \"x\" }} {{ "
       "none or 0 }} {{ 1 and 2 }} {{ \"\" or [] }}",
       "False True True 0 x 0 2 []"},
      {"{{ not 1 == 2 }} {{ not \"a\" in \"b\" }} {{ true and not false or false }}",
       "True True True"},
      {"{{ \"yes\" if 1 else \"no\" }} {{ \"a\" if false else \"b\" if false else \"c\" "
       "}} [{{ \"x\" if false }}] {{ [1] if true }}",
       "yes c [] [1]"},
  });
}

TEST(JinjaAccess, MatchesJinja2) {
  expect_renders({
      {"{{ d.b }} {{ d[\"b\"] }} {{ d.a[1] }} {{ d.a.0 }} {{ d.a[-1] }} {{ msgs[0].role "
       "}} {{ msgs[-1][\"content\"] }}",
       "1 1 2 1 2 system Hello!"},
      {"[{{ d.missing }}] [{{ d.a[9] }}] [{{ \"ab\"[5] }}] {{ d.missing is defined }} {{"
       " d.z is none }}",
       "[] [] [] False True"},
      {"{{ s[0] }} {{ s[1] }} {{ s[-1] }} {{ s[1:4] }} {{ s[::-1] }} {{ s[::2] }} {{ s|l"
       "ength }}",
       "h é d éll dlröw olléh hlowrd 11"},
      {"{{ [1, 2, 3, 4][1:] }} {{ [1, 2, 3, 4][:-1] }} {{ [1, 2, 3, 4][::-2] }} {{ [1, 2"
       ", 3][5:] }} {{ (1, 2, 3)[1:] }} {{ \"abcdef\"[-3:-1] }} {{ \"abc\"[10:0:-1] }}",
       "[2, 3, 4] [1, 2, 3] [4, 2] [] (2, 3) de cb"},
      {"{{ msgs[1:]|length }} {{ msgs[::-1][0].role }} {{ n.attr is defined }}",
       "2 assistant False"},
  });
}

TEST(JinjaWhitespace, MatchesJinja2) {
  expect_renders({
      {"  {% if true %}\n  hi\n  {% endif %}\n  x {# c #}\n   {# c #}\nend\n", "  hi\n  x end"},
      {"{%- for m in nums -%}\n  {{ m }}\n{%- endfor %}\nend", "312end"},
      {"{% for m in nums %}\n  {{ m }}\n{% endfor %}\nend", "  3\n  1\n  2\nend"},
      {"a  {%+ if true %}x{% endif %}\n  {%- if true +%}\ny{% endif %}", "a  x\ny"},
      {"{# comment #}\nA\n  {#- c -#}  B\n{# c +#}\nC", "AB\n\nC"},
      {"{{- \"  x\" -}}  \n  {{ \"y\" }}  {{+ \"z\" }}\n", "  xy  z"},
      {"{% raw %}\n{{ x }}{% if %}{% endraw %}\n|  {%- raw -%}  a  {%- endraw -%}  |",
       "\n{{ x }}{% if %}|a|"},
      {"line1\n    {% if true -%}\n    inner\n    {%- endif %}\nline2\n\n", "line1\ninnerline2\n"},
      {"\t{% set x = 1 %}\n\t{{ x }}\n", "\t1"},
  });
}

TEST(JinjaForLoops, MatchesJinja2) {
  expect_renders({
      {"{% for i in range(5) if i is odd %}{{ loop.index }}/{{ loop.length }}:{{ loop.la"
       "st }} {% else %}none{% endfor %}",
       "1/2:False 2/2:True "},
      {"{% for i in [] %}x{% else %}empty{% endfor %}|{% for i in [1] if false %}x{% els"
       "e %}filtered{% endfor %}",
       "empty|filtered"},
      {"{% for i in [1, 2, 3] %}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}"
       "{{ loop.first }}{{ loop.previtem }}-{{ loop.nextitem }};{% endfor %}",
       "032True-2;121False1-3;210False2-;"},
      {"{% for i in [1, 2, 3] %}{{ loop.cycle(\"a\", \"b\") }}{% endfor %} {% for i in ["
       "1, 1, 2] %}{% if loop.changed(i) %}{{ i }}{% endif %}{% endfor %}",
       "aba 12"},
      {"{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|{% for k in d %}{{ k }}{"
       "% endfor %}|{% for c in \"hé\" %}[{{ c }}]{% endfor %}",
       "b=1;a=[1, 2];z=None;|baz|[h][é]"},
      {"{% for a, b in [(1, 2), [3, 4]] %}{{ a + b }}{% endfor %} {% for (a, b) in [(\"x"
       "\", \"y\")] %}{{ a }}{{ b }}{% endfor %}",
       "37 xy"},
      {"{% for i in [1, 2, 3, 4] %}{% if i == 2 %}{% continue %}{% endif %}{% if i == 4 "
       "%}{% break %}{% endif %}{{ i }}{% endfor %}",
       "13"},
      {"{% for a in [[1, 2], [3]] %}{% for b in a %}{{ loop.index }}{% endfor %}:{{ loop"
       ".index }} {% endfor %}",
       "12:1 1:2 "},
      {"{% set x = 1 %}{% for i in [1, 2] %}{{ x }}{% set x = 2 %}{{ x }}{% endfor %}{{ "
       "x }}",
       "12121"},
      {"{% for i in [1, 2] %}{% if i == 2 %}[{{ y }}]{% endif %}{% set y = i %}{% endfor"
       " %}[{{ i }}]",
       "[][]"},
      {"{% for m in msgs[::-1] %}{{ m.role[0] }}{% endfor %} {% for m in msgs if m.role "
       "!= \"system\" %}{{ loop.index }}{{ m.role }} {% endfor %}",
       "aus 1user 2assistant "},
      {"{% for p in people|selectattr(\"age\", \"defined\")|sort(attribute=\"age\") %}{{"
       " p.name }}{% endfor %}",
       "alBo"},
      {"{{ loop }}{% for i in [1] %}{{ loop.depth }}{{ loop.depth0 }}{% endfor %}", "10"},
  });
}

TEST(JinjaStatements, MatchesJinja2) {
  expect_renders({
      {"{% if false %}a{% elif 0 %}b{% elif \"x\" %}c{% else %}d{% endif %}{% if [] %}e{"
       "% else %}f{% endif %}",
       "cf"},
      {"{% if true %}{% set z = 5 %}{% endif %}{{ z }} {% set a, b = 1, 2 %}{{ a }}{{ b "
       "}} {% set t = 1, 2 %}{{ t }}",
       "5 12 (1, 2)"},
      {"{% set x %}{% set y = 1 %}block {{ 2 }}{% endset %}[{{ y }}]{{ x }} {% set u | u"
       "pper %}up{% endset %}{{ u }}",
       "[]block 2 UP"},
      {"{% with a = 1, b = 2 %}{{ a + b }}{% set c = 3 %}{% endwith %}[{{ a }}{{ c }}]", "3[]"},
      {"{% set ns = namespace(count=0, names=[]) %}{% for p in people %}{% set ns.count "
       "= ns.count + 1 %}{% set ns.names = ns.names + [p.name] %}{% endfor %}{{ ns.count"
       " }} {{ ns.names }} {{ ns }}",
       "3 ['Bo', 'al', 'Cy'] <Namespace {'count': 3, 'names': ['Bo', 'al', 'Cy']}>"},
      {"{% set ns = namespace({\"a\": 1}, b=2) %}{{ ns.a }}{{ ns.b }}[{{ ns.c }}]{{ ns["
       "\"a\"] }}",
       "12[]1"},
      {"{% filter upper %}{% set c = 3 %}shout {{ \"it\" }}{% endfilter %}[{{ c }}]", "SHOUT IT[]"},
      {"{% generation %}{% set e = 5 %}gen{% endgeneration %}[{{ e }}]", "gen[]"},
      {"{% set v = 1 %}{% set v = v + 1 %}{{ v }}", "2"},
  });
}

TEST(JinjaMacros, MatchesJinja2) {
  expect_renders({
      {"{% macro m(a, b=2) %}{{ a }}{{ b }}{{ x }}{% endmacro %}{% set x = 9 %}{{ m(1) }"
       "} {{ m(1, b=3) }} {{ m(b=4, a=5) }}",
       "129 139 549"},
      {"{% macro m(a) %}{{ varargs }}{{ kwargs }}{% endmacro %}{{ m(1, 2, k=3) }}", "(2,){'k': 3}"},
      {"{% macro m(a, b=a + 1) %}{{ a }}{{ b }}[{{ c }}]{% endmacro %}{{ m(1) }}", "12[]"},
      {"{{ m }}{% macro m() %}{% endmacro %}{{ m }}", "<Macro 'm'>"},
      {"{% macro fact(n) %}{% if n <= 1 %}1{% else %}{{ n * fact(n - 1)|int }}{% endif %"
       "}{% endmacro %}{{ fact(5) }}",
       "120"},
      {"{% macro wrap(tag) %}<{{ tag }}>{{ caller() }}</{{ tag }}>{% endmacro %}{% call "
       "wrap(\"b\") %}bold{% endcall %}",
       "<b>bold</b>"},
      {"{% macro each(xs) %}{% for x in xs %}{{ caller(x, loop.index) }}{% endfor %}{% e"
       "ndmacro %}{% call(v, i) each([\"a\", \"b\"]) %}{{ i }}={{ v }} {% endcall %}",
       "1=a 2=b "},
      {"{% macro m() %}{% set inner = 1 %}{{ inner }}{% endmacro %}{{ m() }}[{{ inner }}"
       "]{{ m() ~ \"!\" }}",
       "1[]1!"},
  });
}

TEST(JinjaFilters1, MatchesJinja2) {
  expect_renders({
      {"{{ \"  x  \"|trim }}|{{ \"xxhixx\"|trim(\"x\") }}|{{ \"hello world\"|title }}|{{"
       " \"hELLO wORLD\"|capitalize }}|{{ \"MiXed\"|lower }}{{ \"MiXed\"|upper }}",
       "x|hi|Hello World|Hello world|mixedMIXED"},
      {"{{ [1, 2]|join(\",\") }}|{{ [\"a\", \"b\"]|join }}|{{ people|join(\", \", attrib"
       "ute=\"name\") }}|{{ [1, 2]|first }}{{ [1, 2]|last }}|{{ \"ab\"|first }}|[{{ []|f"
       "irst }}]",
       "1,2|ab|Bo, al, Cy|12|a|[]"},
      {"{{ nums|length }}{{ \"héllo\"|length }}{{ d|length }}{{ nums|count }}{{ undefine"
       "d_thing|length }}",
       "35330"},
      {"{{ undefined_thing|default(\"dflt\") }}|{{ \"\"|default(\"e\", true) }}|{{ \"\"|"
       "default(\"e\") }}|{{ none|default(\"z\") }}|{{ none|d(\"z\", boolean=true) }}",
       "dflt|e||None|z"},
      {"{{ d|items|list }} {{ d|list }} {{ \"ab\"|list }} {{ d|dictsort }} {{ d|dictsort"
       "(reverse=true) }}",
       "[('b', 1), ('a', [1, 2]), ('z', None)] ['b', 'a', 'z'] ['a', 'b'] [('a', [1, 2])"
       ", ('b', 1), ('z', None)] [('z', None), ('b', 1), ('a', [1, 2])]"},
      {"{{ nums|sort }} {{ [\"b\", \"A\", \"c\"]|sort }} {{ [\"b\", \"A\", \"c\"]|sort(c"
       "ase_sensitive=true) }} {{ nums|sort(reverse=true) }} {{ [[2, 1], [1, 2]]|sort }}",
       "[1, 2, 3] ['A', 'b', 'c'] ['A', 'b', 'c'] [3, 2, 1] [[1, 2], [2, 1]]"},
      {"{{ people|sort(attribute=\"name\")|map(attribute=\"name\")|list }} {{ people|map"
       "(attribute=\"age\", default=0)|list }} {{ nums|map(\"string\")|join(\"-\") }}",
       "['al', 'Bo', 'Cy'] [30, 25, 0] 3-1-2"},
      {"{{ nums|select(\"odd\")|list }} {{ nums|reject(\"odd\")|list }} {{ [0, 1, \"\", "
       "\"a\"]|select|list }} {{ people|selectattr(\"age\")|map(attribute=\"name\")|list"
       " }} {{ people|rejectattr(\"age\", \"defined\")|list }}",
       "[3, 1] [2] [1, 'a'] ['Bo', 'al'] [{'name': 'Cy'}]"},
      {"{{ people|selectattr(\"name\", \"equalto\", \"Bo\")|list }} {{ [1, 2, 3, 4]|sele"
       "ct(\"divisibleby\", 2)|list }} {{ nums|select(\">\", 1)|list }}",
       "[{'name': 'Bo', 'age': 30}] [2, 4] [3, 2]"},
      {"{{ [1, 1, 2, \"a\", \"A\"]|unique|list }} {{ [\"a\", \"A\"]|unique(case_sensitiv"
       "e=true)|list }} {{ nums|reverse|list }} {{ \"abc\"|reverse }}",
       "[1, 2, 'a'] ['a', 'A'] [2, 1, 3] cba"},
  });
}

TEST(JinjaFilters2, MatchesJinja2) {
  expect_renders({
      {"{{ \"3.7\"|int }} {{ \"x\"|int }} {{ \"x\"|int(7) }} {{ \" 12 \"|int }} {{ \"1_0"
       "00\"|int }} {{ \"0x1A\"|int(base=16) }} {{ 5.9|int }} {{ true|int }} {{ none|int"
       " }}",
       "3 0 7 12 1000 26 5 1 0"},
      {"{{ \"3\"|float }} {{ \"abc\"|float }} {{ \"1e3\"|float }} {{ 2|float }} {{ -2|ab"
       "s }} {{ -2.5|abs }}",
       "3.0 0.0 1000.0 2.0 2 2.5"},
      {"{{ 3|round }} {{ 2.5|round }} {{ 3.5|round }} {{ 2.675|round(2) }} {{ 3.14159|ro"
       "und(3) }} {{ 3.2|round(0, \"ceil\") }} {{ 3.8|round(0, \"floor\") }} {{ 1234|rou"
       "nd(-2) }}",
       "3 2.0 4.0 2.67 3.142 4.0 3.0 1200"},
      {"{{ \"a\nb\nc\"|indent(2) }}|{{ \"a\n\nb\"|indent(2, true) }}|{{ \"a\n\nb\"|inden"
       "t(2, blank=true) }}|{{ \"a\nb\"|indent(\"> \") }}",
       "a\n  b\n  c|  a\n\n  b|a\n  \n  b|a\n> b"},
      {"{{ \"a b  c\"|wordcount }} {{ \"abc\"|center(9) }}| {{ \"a-b-a\"|replace(\"a\", "
       "\"x\") }} {{ \"aaa\"|replace(\"a\", \"b\", 2) }} {{ \"ab\"|replace(\"\", \"-\") "
       "}}",
       "3    abc   | x-b-x bba -a-b-"},
      {"{{ [1, 2, 3]|sum }} {{ people[:2]|sum(attribute=\"age\") }} {{ [1.5, 2]|sum(star"
       "t=1) }} {{ nums|max }} {{ nums|min }} {{ [\"b\", \"A\"]|min }} {{ people[:2]|max"
       "(attribute=\"age\") }} [{{ []|max }}]",
       "6 55 4.5 3 1 A {'name': 'Bo', 'age': 30} []"},
      {"{{ [1, 2, 3, 4, 5]|batch(2)|list }} {{ [1, 2, 3]|batch(2, \"x\")|list }} {{ [1, "
       "2, 3, 4, 5]|slice(2)|list }}",
       "[[1, 2], [3, 4], [5]] [[1, 2], [3, 'x']] [[1, 2, 3], [4, 5]]"},
      {"{{ \"hello world foo\"|truncate(9) }}|{{ \"hello world foo\"|truncate(9, true) }"
       "}|{{ \"hello\"|truncate(9) }}",
       "hello...|hello ...|hello"},
      {"{{ \"<a href='x'>&\\\"</a>\"|e }} {{ \"<b>\"|escape }} {{ \"x\"|safe }} {{ 5|str"
       "ing }} {{ [1]|string }} {{ \"%s-%s\"|format(1, \"a\") }}",
       "&lt;a href=&#39;x&#39;&gt;&amp;&#34;&lt;/a&gt; &lt;b&gt; x 5 [1] 1-a"},
      {"{{ d|attr(\"b\") }}[{{ d|attr(\"zz\") }}] {{ people|map(\"attr\", \"name\")|list"
       " }}",
       "[] [Undefined, Undefined, Undefined]"},
  });
}

TEST(JinjaToJson, MatchesJinja2) {
  expect_renders({
      {"{{ \"x\"|tojson }} {{ {\"a\": [1, 2.0, \"é\\n\\t\\\"\\\\\\u0001\"]}|tojson }} {{"
       " [1.5, 1e20, true, none] | tojson }}",
       "\"x\" {\"a\": [1, 2.0, \"é\\n\\t\\\"\\\\\\u0001\"]} [1.5, 1e+20, true, null]"},
      {"{{ d|tojson }} {{ d|tojson(indent=2) }} {{ d|tojson(indent=0) }} {{ [[]]|tojson("
       "indent=2) }} {{ {}|tojson(indent=2) }}",
       "{\"b\": 1, \"a\": [1, 2], \"z\": null} {\n  \"b\": 1,\n  \"a\": [\n    1,\n    2"
       "\n  ],\n  \"z\": null\n} {\n\"b\": 1,\n\"a\": [\n1,\n2\n],\n\"z\": null\n} [\n  "
       "[]\n] {}"},
      {"{{ {\"b\": 1, \"a\": 2}|tojson(sort_keys=true) }} {{ {\"a\": 1, \"b\": [1]}|tojs"
       "on(separators=(\",\", \":\")) }} {{ {\"a\": [1]}|tojson(indent=\"\\t\") }}",
       "{\"a\": 2, \"b\": 1} {\"a\":1,\"b\":[1]} {\n\t\"a\": [\n\t\t1\n\t]\n}"},
      {"{{ \"é✓😀\"|tojson }} {{ \"é✓😀\"|tojson(ensure_ascii=true) }} {{ {1: \"int key"
       "\", none: 0, true: 1}|tojson }}",
       "\"é✓😀\" \"\\u00e9\\u2713\\ud83d\\ude00\" {\"1\": 1, \"null\": 0}"},
      {"{{ msgs|tojson }}",
       "[{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"cont"
       "ent\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}]"},
  });
}

TEST(JinjaTests, MatchesJinja2) {
  expect_renders({
      {"{{ 10 is divisibleby 5 }} {{ 10 is divisibleby(3) }} {{ 3 is even }} {{ 3 is odd"
       " }} {{ 1 is number }} {{ true is number }} {{ true is integer }} {{ 1 is integer"
       " }} {{ 1.0 is float }}",
       "True False False True True True False True True"},
      {"{{ \"a\" is string }} {{ 1 is string }} {{ d is mapping }} {{ nums is mapping }}"
       " {{ \"a\" is sequence }} {{ d is sequence }} {{ nums is iterable }} {{ 1 is iter"
       "able }} {{ undefined_thing is iterable }}",
       "True False True False True True True False True"},
      {"{{ none is none }} {{ 0 is none }} {{ false is false }} {{ 0 is false }} {{ true"
       " is true }} {{ true is boolean }} {{ 1 is boolean }}",
       "True False True False True True False"},
      {"{{ x is defined }} {{ x is undefined }} {{ d is defined }} {{ d.b is defined }} "
       "{{ d.q is not defined }} {{ n is not none }}",
       "False True True True True False"},
      {"{{ 1 is eq 1 }} {{ 1 is equalto 2 }} {{ 2 is gt 1 }} {{ 2 is lt 1 }} {{ 2 is ge "
       "2 }} {{ 1 is le 0 }} {{ 1 is ne 1 }} {{ 2 is in [1, 2] }} {{ \"a\" is in \"bc\" "
       "}}",
       "True False True False True False False True False"},
      {"{{ \"abc\" is lower }} {{ \"Abc\" is lower }} {{ \"ABC\" is upper }} {{ \"\" is "
       "lower }} {{ none is sameas none }} {{ \"upper\" is filter }} {{ \"odd\" is test "
       "}} {{ \"nope\" is filter }}",
       "True False True False True True True False"},
  });
}

TEST(JinjaStringMethods, MatchesJinja2) {
  expect_renders({
      {"{{ \"abc\".startswith(\"a\") }} {{ \"abc\".startswith((\"x\", \"a\")) }} {{ \"ab"
       "c\".endswith(\"bc\") }} {{ \"abc\".startswith(\"b\", 1) }} {{ \"<t>x</t>\".endsw"
       "ith(\"</t>\") }}",
       "True True True True True"},
      {"[{{ \"  x \".strip() }}][{{ \"xyx\".strip(\"x\") }}][{{ \"\n\nx\n\".lstrip(\"\n"
       "\") }}][{{ \"x  \".rstrip() }}][{{ \"  x\".lstrip() }}]",
       "[x][y][x\n][x][x]"},
      {"{{ \"a,b,,c\".split(\",\") }} {{ \"  a b  \".split() }} {{ \"a b c\".split(\" \""
       ", 1) }} {{ \"a-b-c\".rsplit(\"-\", 1) }} {{ \"a\nb\r\nc\".splitlines() }} {{ \"x"
       "</think>y\".split(\"</think>\")[-1] }}",
       "['a', 'b', '', 'c'] ['a', 'b'] ['a', 'b c'] ['a-b', 'c'] ['a', 'b', 'c'] y"},
      {"{{ \"a-b\".replace(\"-\", \"+\") }} {{ \"ab\".upper() }} {{ \"AbC\".lower() }} {"
       "{ \"hello world's\".title() }} {{ \"hELLO\".capitalize() }} {{ \"AbC\".swapcase("
       ") }}",
       "a+b AB abc Hello World'S Hello aBc"},
      {"{{ \"abc\".find(\"c\") }} {{ \"abc\".find(\"z\") }} {{ \"abab\".rfind(\"b\") }} "
       "{{ \"aaa\".count(\"a\") }} {{ \"abc\".index(\"b\") }} {{ \"héllo\".find(\"l\") }"
       "}",
       "2 -1 3 3 1 2"},
      {"{{ \"-\".join([\"a\", \"b\"]) }} {{ \"ab\".center(6, \"*\") }} {{ \"ab\".ljust(4"
       ", \".\") }}|{{ \"ab\".rjust(4) }} {{ \"42\".zfill(5) }} {{ \"-42\".zfill(5) }} {"
       "{ \"abc\".removeprefix(\"a\") }} {{ \"abc\".removesuffix(\"c\") }} {{ \"a=b=c\"."
       "partition(\"=\") }} {{ \"a=b=c\".rpartition(\"=\") }}",
       "a-b **ab** ab..|  ab 00042 -0042 bc ab ('a', '=', 'b=c') ('a=b', '=', 'c')"},
      {"{{ \"abc\".isalpha() }} {{ \"12\".isdigit() }} {{ \" \t\".isspace() }} {{ \"\".i"
       "salpha() }} {{ \"AB\".isupper() }} {{ \"Ab\".islower() }} {{ \"a1\".isalnum() }}",
       "True True True False True False True"},
      {"{{ \"{} and {}\".format(1, \"b\") }} {{ \"{0}{1}{0}\".format(\"x\", \"y\") }} {{"
       " \"{name}!\".format(name=\"Bo\") }} {{ \"{:>5}|{:<4}|{:^7}|{:.2f}|{!r}\".format("
       "\"a\", \"b\", \"c\", 2.5, \"d\") }} {{ \"{{x}}\".format() }}",
       "1 and b xyx Bo!     a|b   |   c   |2.50|'d' {x}"},
      {"{{ \"%s and %s\" % (\"a\", 1) }} {{ \"%d%%\" % 50 }} {{ \"%5.2f|%-4s|%03d|%x\" %"
       " (3.14159, \"ab\", 7, 255) }} {{ \"%(a)s\" % {\"a\": 1} }} {{ \"%r\" % \"q\" }}",
       "a and 1 50%  3.14|ab  |007|ff 1 'q'"},
  });
}

TEST(JinjaDictMethods, MatchesJinja2) {
  expect_renders({
      {"{{ d.items() }} {{ d.keys() }} {{ d.values() }} {{ d.get(\"b\") }} {{ d.get(\"q"
       "\") }} {{ d.get(\"q\", 0) }} {{ d.copy() == d }}",
       "dict_items([('b', 1), ('a', [1, 2]), ('z', None)]) dict_keys(['b', 'a', 'z']) di"
       "ct_values([1, [1, 2], None]) 1 None 0 True"},
      {"{{ nums.index(1) }} {{ [1, 1, 2].count(1) }} {{ dict(a=1, b=2) }} {{ dict({\"x\""
       ": 1}, y=2) }} {{ dict([(\"k\", \"v\")]) }}",
       "1 2 {'a': 1, 'b': 2} {'x': 1, 'y': 2} {'k': 'v'}"},
      {"{% set j = joiner(\", \") %}{% for i in [1, 2, 3] %}{{ j() }}{{ i }}{% endfor %}"
       " {% set c = cycler(\"a\", \"b\") %}{{ c.next() }}{{ c.next() }}{{ c.next() }}{{ "
       "c.current }}",
       "1, 2, 3 abab"},
      {"{{ range(3)|list }} {{ range(1, 10, 3)|list }} {{ range(5, 0, -2)|list }} {{ ran"
       "ge(0)|list }}",
       "[0, 1, 2] [1, 4, 7] [5, 3, 1] []"},
  });
}

TEST(JinjaUndefined, MatchesJinja2) {
  expect_renders({
      {"[{{ undefined_thing }}][{{ undefined_thing|upper }}][{{ undefined_thing|trim }}]"
       "[{{ undefined_thing|join }}][{{ undefined_thing|list }}]",
       "[][][][][[]]"},
      {"{% for a in undefined_thing %}x{% else %}empty{% endfor %} {{ \"a\" in undefined"
       "_thing }} {{ undefined_thing == undefined_other }} {{ not undefined_thing }}",
       "empty False True True"},
      {"{{ undefined_thing is defined }} {{ undefined_thing|default(\"d\") }} {{ undefin"
       "ed_thing|items|list }} {{ undefined_thing|string }}|{{ (undefined_thing ~ \"x\")"
       " }}",
       "False d [] |x"},
      {"{{ none.attr is defined }} {{ n.x|default(\"nd\") }} {{ 5.attr is defined }}",
       "False nd False"},
  });
}

// ---- errors -----------------------------------------------------------------------------------

TEST(JinjaErrors, SyntaxErrorsNameTheLine) {
  struct {
    const char* tmpl;
    const char* message;
  } cases[] = {
      {"line1\n{% if %}x{% endif %}", "syntax error at line 2: Expected an expression"},
      {"{% for x in y %}\nabc", "line 2: unexpected end of template: missing 'endfor' or 'else'"},
      {"a\n\n{% foo %}", "line 3: Encountered unknown tag 'foo'."},
      {"{% if true %}{% endfor %}", "Encountered unknown tag 'endfor'"},
      {"{% endif %}", "line 1: Encountered unknown tag 'endif'."},
      {"x\n{{ x ", "line 2: unexpected end of template, expected '}}'"},
      {"{# abc", "line 1: Missing end of comment tag"},
      {"{{ (1 }}", "unexpected '}', expected ')'"},
      {"{{ 1 + }}", "unexpected end of print statement"},
      {"{{ \"abc }}", "unexpected end of string"},
      {"{% break %}", "'break' outside of a loop"},
      {"{% set 1 = 2 %}", "can't assign to integer"},
      {"{% macro m(a=1, b) %}{% endmacro %}", "non-default argument follows default argument"},
      {"{% for x in y recursive %}{% endfor %}", "recursive for loops are not supported"},
      {"{% raw %}abc", "Missing end of raw directive"},
      {"{{ x is defined is defined }}", "You cannot chain multiple tests with is"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.tmpl);
    std::string err = error_of(c.tmpl);
    EXPECT_NE(err.find("jinja template syntax error"), std::string::npos) << err;
    EXPECT_NE(err.find(c.message), std::string::npos) << err;
  }
}

TEST(JinjaErrors, FileAccessTagsAreRejected) {
  for (const char* tag : {"include \"x.j2\"", "import \"x.j2\" as x", "from \"x\" import y",
                          "extends \"base.j2\"", "block body"}) {
    std::string err = error_of(std::string("a\n{% ") + tag + " %}");
    EXPECT_NE(err.find("line 2"), std::string::npos) << err;
    EXPECT_NE(err.find("is not supported: templates are sandboxed"), std::string::npos) << err;
  }
}

TEST(JinjaErrors, RuntimeErrorsNameTheLine) {
  struct {
    const char* tmpl;
    const char* message;
  } cases[] = {
      {"a\n{{ foo.bar }}", "jinja template error at line 2: 'foo' is undefined"},
      {"{{ {}.a.b }}", "'dict object' has no attribute 'a'"},
      {"{{ undefined_fn() }}", "'undefined_fn' is undefined"},
      {"{{ 5() }}", "'int' object is not callable"},
      {"{{ \"a\" + 1 }}", "can only concatenate str (not \"int\") to str"},
      {"{{ 1 < \"a\" }}", "'<' not supported between instances of 'int' and 'str'"},
      {"{{ 1 / 0 }}", "division by zero"},
      {"{{ 1 // 0 }}", "integer division or modulo by zero"},
      {"{{ 2 ** 64 }}", "integer overflow"},
      {"{{ [1, \"a\"]|sort }}", "'<' not supported between instances of 'str' and 'int'"},
      {"{{ x|nofilter }}", "No filter named 'nofilter'"},
      {"{{ x is notest }}", "No test named 'notest'"},
      {"{% macro m(a) %}{% endmacro %}{{ m(1, 2) }}",
       "macro 'm' takes not more than 1 argument(s)"},
      {"{% macro m(a) %}{% endmacro %}{{ m(k=2) }}", "macro 'm' takes no keyword argument 'k'"},
      {"{% set x.y = 1 %}", "Cannot assign attribute on non-namespace object"},
      {"{% for a, b in [1] %}{% endfor %}", "'int' object is not iterable"},
      {"{% for a, b in [[1]] %}{% endfor %}", "not enough values to unpack (expected 2, got 1)"},
      {"{{ none|tojson }}{{ undefined_thing|tojson }}",
       "Object of type Undefined is not JSON serializable"},
      {"{{ \"{} {0}\".format(1) }}", "cannot switch from automatic field numbering"},
      {"{{ \"%d\" % \"x\" }}", "%d format: a real number is required, not str"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.tmpl);
    std::string err = error_of(c.tmpl, ojson{{"x", 1}});
    EXPECT_NE(err.find(c.message), std::string::npos) << err;
  }
}

TEST(JinjaErrors, RaiseExceptionIsOneLine) {
  std::string err = error_of("ok\n{{ raise_exception('Roles must alternate\\nuser/assistant') }}");
  EXPECT_EQ(err, "jinja template raised an error at line 2: Roles must alternate\\nuser/assistant");
}

// ---- sandbox limits -----------------------------------------------------------------------------

TEST(JinjaSandbox, OutputIsBounded) {
  JinjaOptions opts;
  opts.max_output_bytes = 1000;
  EXPECT_EQ(render("{% for i in range(100) %}0123456789{% endfor %}", ojson::object(), opts).size(),
            1000u);
  std::string err =
      error_of("{% for i in range(101) %}0123456789{% endfor %}", ojson::object(), opts);
  EXPECT_NE(err.find("output exceeds max_output_bytes (1000)"), std::string::npos) << err;
  // Intermediate strings are capped too, so a template cannot allocate without printing.
  err = error_of("{% set x = 'x' * 1000000000 %}");
  EXPECT_NE(err.find("string exceeds max_output_bytes"), std::string::npos) << err;
  err = error_of("{% set x %}{% for i in range(101) %}0123456789{% endfor %}{% endset %}",
                 ojson::object(), opts);
  EXPECT_NE(err.find("output exceeds max_output_bytes"), std::string::npos) << err;
}

TEST(JinjaSandbox, LoopIterationsAreBounded) {
  JinjaOptions opts;
  opts.max_loop_iterations = 1100;  // 510 loop iterations + 510 elements made by range()
  EXPECT_NO_THROW(render("{% for i in range(10) %}{% for j in range(50) %}{% endfor %}{% endfor %}",
                         ojson::object(), opts));
  std::string err =
      error_of("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
  EXPECT_NE(err.find("loop iteration limit exceeded (max_loop_iterations = 1048576)"),
            std::string::npos)
      << err;
  // jinja2's sandbox refuses huge ranges outright.
  err = error_of("{{ range(200000)|length }}");
  EXPECT_NE(err.find("Range too big"), std::string::npos) << err;
  // Filters that walk sequences count as work.
  err = error_of("{{ range(100000)|list|join }}", ojson::object(), opts);
  EXPECT_NE(err.find("loop iteration limit exceeded"), std::string::npos) << err;
}

TEST(JinjaSandbox, RecursionIsBounded) {
  std::string err = error_of("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}");
  EXPECT_NE(err.find("maximum recursion depth exceeded (max_recursion_depth = 100)"),
            std::string::npos)
      << err;
  JinjaOptions opts;
  opts.max_recursion_depth = 5;
  const char* countdown =
      "{% macro c(n) %}{{ n }}{% if n > 0 %}{{ c(n - 1) }}{% endif %}{% endmacro %}{{ c(N) }}";
  EXPECT_EQ(render(countdown, ojson{{"N", 4}}, opts), "43210");
  EXPECT_NE(error_of(countdown, ojson{{"N", 5}}, opts).find("maximum recursion depth"),
            std::string::npos);
}

TEST(JinjaSandbox, NestingIsBounded) {
  // Parser depth: deeply nested expressions and blocks are syntax errors, not stack overflows.
  std::string deep = "{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}";
  EXPECT_NE(error_of(deep).find("template nests deeper than"), std::string::npos);
  std::string blocks;
  for (int i = 0; i < 5000; ++i) blocks += "{% if true %}";
  EXPECT_NE(error_of(blocks).find("template nests deeper than"), std::string::npos);
  // Value depth: built by the template or passed in the context.
  std::string err = error_of(
      "{% set ns = namespace(x=[]) %}{% for i in range(1000) %}{% set ns.x = [ns.x] %}{% endfor "
      "%}");
  EXPECT_NE(err.find("value nests deeper than 256 levels"), std::string::npos) << err;
  ojson nested = ojson::array();
  for (int i = 0; i < 1000; ++i) nested = ojson::array({nested});
  err = error_of("{{ x }}", ojson{{"x", nested}});
  EXPECT_NE(err.find("context nests deeper than"), std::string::npos) << err;
  // A namespace that contains itself cannot be printed, but must not crash or leak.
  err = error_of("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}");
  EXPECT_NE(err.find("maximum recursion depth exceeded"), std::string::npos) << err;
}

// Chains are built by loops in the parser, not recursion, but evaluated and freed recursively:
// 100k links used to overflow the stack. They are syntax errors naming the line now.
TEST(JinjaSandbox, LongChainsAreRefused) {
  const int n = 50000;
  auto repeat = [](const std::string& s, int times) {
    std::string out;
    for (int i = 0; i < times; ++i) out += s;
    return out;
  };
  const std::string chains[] = {
      "{{ a" + repeat(".b", n) + " }}",     // attributes
      "{{ a" + repeat("[0]", n) + " }}",    // subscripts
      "{{ f" + repeat("()", n) + " }}",     // calls
      "{{ x" + repeat("|trim", n) + " }}",  // filters
      "{{ 1" + repeat(" + 1", n) + " }}",   // left-associative operators
      "{{ a" + repeat(" or a", n) + " }}",
  };
  for (const std::string& tmpl : chains) {
    SCOPED_TRACE(tmpl.substr(0, 20));
    std::string err = error_of("\n" + tmpl);
    EXPECT_NE(err.find("syntax error at line 2: expression nests deeper than 200 levels"),
              std::string::npos)
        << err;
  }
  // Recursive forms hit the parser's depth limit (parentheses are covered by NestingIsBounded).
  for (const std::string& tmpl :
       {"{{ " + repeat("[", n) + repeat("]", n) + " }}", "{{ " + repeat("- ", n) + "1 }}",
        "{{ " + repeat("not ", n) + "1 }}",
        "{{ " + repeat("{'a': ", n) + "1" + repeat("}", n) + " }}",
        "{{ a" + repeat(" if a else a", n) + " }}"}) {
    EXPECT_NE(error_of(tmpl).find("nests deeper than"), std::string::npos) << tmpl.substr(0, 20);
  }
  // Chains of a realistic length are fine.
  EXPECT_EQ(render("{{ s" + repeat("|trim", 150) + " }}", ojson{{"s", " x "}}), "x");
  EXPECT_EQ(render("{{ 0" + repeat(" + 1", 150) + " }}"), "150");
}

// Values share sub-lists, so a namespace doubled 40 times is a small value whose repr, JSON or
// comparison is 2^40 long: the output cap and the loop budget stop them as they grow.
TEST(JinjaSandbox, SharedValuesAreBounded) {
  const std::string build =
      "{% set ns = namespace(x=[1], y=[1]) %}{% for i in range(40) %}"
      "{% set ns.x = [ns.x, ns.x] %}{% set ns.y = [ns.y, ns.y] %}{% endfor %}";
  JinjaOptions opts;
  opts.max_output_bytes = 65536;
  opts.max_loop_iterations = 65536;
  std::string err = error_of(build + "{{ ns.x }}", ojson::object(), opts);
  EXPECT_NE(err.find("string exceeds max_output_bytes (65536)"), std::string::npos) << err;
  err = error_of(build + "{{ ns.x|tojson }}", ojson::object(), opts);
  EXPECT_NE(err.find("string exceeds max_output_bytes (65536)"), std::string::npos) << err;
  err = error_of(build + "{{ ns.x == ns.y }}", ojson::object(), opts);
  EXPECT_NE(err.find("loop iteration limit exceeded (max_loop_iterations = 65536)"),
            std::string::npos)
      << err;
  // A long indent string is repeated once per level for every item.
  err = error_of(
      "{% set ns = namespace(x=[]) %}{% for i in range(200) %}{% set ns.x = [ns.x] %}{% endfor %}"
      "{{ ns.x|tojson(indent='x' * 1000000) }}");
  EXPECT_NE(err.find("string exceeds max_output_bytes"), std::string::npos) << err;
  EXPECT_EQ(render(build + "{{ ns.x == ns.x }}"), "True");  // the same list: no walk
}

// Filters, methods and operators whose result can be far larger than their input check the cap
// (or the loop budget) before allocating, and fail with a template error, never bad_alloc,
// std::out_of_range or a hang.
TEST(JinjaSandbox, GrowingFiltersCheckTheCapFirst) {
  std::vector<std::string> over_cap = {
      "{{ '%999999999d' % 1 }}",
      "{{ '%.999999999f' % 1.5 }}",
      "{{ '%99999999999999999999s' % 'x' }}",
      "{{ '%999999999s'|format('x') }}",
      "{{ 'x'|indent(1000000000000000) }}",
      "{% set s = 'x' * 1000000 %}{{ s|replace('x', s) }}",
      "{% set s = 'x' * 1000000 %}{{ s.replace('', s) }}",
      "{{ 'ab'.center(4611686018427387904) }}",
      "{{ 'ab'.ljust(4611686018427387904, 'x') }}",
  };
  // Each escape adds 4 bytes per '&': 150 of them would reach 2.4 GB before anything printed.
  std::string escapes = "{{ ('&' * 4000000)";
  for (int i = 0; i < 150; ++i) escapes += "|e";
  over_cap.push_back(escapes + " }}");
  for (const std::string& tmpl : over_cap) {
    std::string err = error_of(tmpl);
    // "string": an intermediate value was refused, before anything reached the output.
    EXPECT_NE(err.find("string exceeds max_output_bytes"), std::string::npos)
        << tmpl.substr(0, 60) << ": " << err;
  }
  // Elements (list items, split parts, the characters a loop walks) are counted before they
  // are made: one Value per character of a 16 MiB string is gigabytes.
  const char* over_budget[] = {
      "{{ [1]|batch(1000000000000, 0)|length }}",
      "{{ ([[1] * 1000] * 2000)|sum(start=[])|length }}",
      "{% for c in 'x' * 1000000 %}{% break %}{% endfor %}",
      "{{ ('x' * 1000000).split('x')|length }}",
      "{{ ('x ' * 500000).split()|length }}",
      "{{ ('\\n' * 1000000).splitlines()|length }}",
  };
  JinjaOptions opts;
  opts.max_loop_iterations = 10000;
  for (const char* tmpl : over_budget) {
    std::string err = error_of(tmpl, ojson::object(), opts);
    EXPECT_NE(err.find("loop iteration limit exceeded"), std::string::npos) << tmpl << ": " << err;
  }
  // first/last of a long string need no element per character.
  EXPECT_EQ(
      render("{{ ('é' ~ 'x' * 2000000)|first }}{{ ('x' * 2000000 ~ '€')|last }}{{ ''|last }}"),
      "é€");
  // Repeating nothing is nothing, however many times (this used to loop 10^15 times).
  EXPECT_EQ(render("{{ ('' * 1000000000000000)|length }} {{ ([] * 1000000000000000)|length }}"),
            "0 0");
  // Huge lengths and indices: no integer overflow, no std::out_of_range.
  EXPECT_EQ(render("{{ 'abc'|truncate(9223372036854775807) }}"), "abc");
  EXPECT_EQ(render("{{ 'abcdefghij'|truncate(5, leeway=9223372036854775807) }}"), "abcdefghij");
  EXPECT_NE(error_of("{{ '{99999999999999999999}'.format(1) }}").find("out of range"),
            std::string::npos);
  EXPECT_EQ(render("{{ [[1]]|map(attribute='0.99999999999999999999')|first is defined }}"),
            "False");
  EXPECT_NE(error_of("{{ '%c' % 1114112 }}").find("%c arg not in range(0x110000)"),
            std::string::npos);
  // Widths within the cap keep Python's output (they used to be cut at 511 characters).
  EXPECT_EQ(render("{{ ('%600d' % 7)|length }} {{ '%5.1f|%-4d|%03d' % (2.25, 7, 5) }}"),
            "600   2.2|7   |005");
}

// A macro that calls itself twice per level makes 2^depth calls within the recursion limit;
// every call counts against the loop budget.
TEST(JinjaSandbox, MacroFanOutIsBounded) {
  const char* fan_out =
      "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
      "{{ f(N) }}.";
  JinjaOptions opts;
  opts.max_loop_iterations = 100000;
  std::string err = error_of(fan_out, ojson{{"N", 40}}, opts);
  EXPECT_NE(err.find("loop iteration limit exceeded (max_loop_iterations = 100000)"),
            std::string::npos)
      << err;
  EXPECT_EQ(render(fan_out, ojson{{"N", 12}}, opts), ".");  // 8191 calls
  // The work inside each call or iteration counts too: a large body is more than one step.
  opts = JinjaOptions();
  opts.max_steps = 100000;
  std::string body;
  for (int i = 0; i < 1000; ++i) body += "{% set x = i %}";
  err = error_of("{% for i in range(1000) %}" + body + "{% endfor %}", ojson::object(), opts);
  EXPECT_NE(err.find("step limit exceeded (max_steps = 100000)"), std::string::npos) << err;
  EXPECT_EQ(
      render("{% for i in range(10) %}" + body + "{% endfor %}{{ x }}", ojson::object(), opts), "");
}

// Runs fn on a thread with a stack of `bytes` (std::thread cannot choose its stack size).
void run_with_stack(size_t bytes, std::function<void()> fn) {
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, bytes);
  pthread_t thread;
  auto body = [](void* f) -> void* {
    (*static_cast<std::function<void()>*>(f))();
    return nullptr;
  };
  ASSERT_EQ(pthread_create(&thread, &attr, body, &fn), 0);
  pthread_join(thread, nullptr);
  pthread_attr_destroy(&attr);
}

// Each limit holds, but 100 macro levels that each evaluate a 190-link chain need ~20 MB of C++
// stack: whatever the thread's stack size, running out of it is an error, not a crash.
TEST(JinjaSandbox, StackExhaustionIsAnError) {
  std::string chain = "m(n - 1)";
  for (int i = 0; i < 190; ++i) chain += "|trim";
  const std::string deep =
      "{% macro m(n) %}{% if n > 0 %}{{ " + chain + " }}{% endif %}x{% endmacro %}{{ m(99) }}";
  const std::string countdown =
      "{% macro c(n) %}{{ n % 10 }}{% if n > 0 %}{{ c(n - 1) }}{% endif %}{% endmacro %}{{ c(98) "
      "}}";
  for (size_t stack : {size_t{512} << 10, size_t{8} << 20}) {
    std::string err, ok;
    run_with_stack(stack, [&] {
      err = error_of(deep);
      ok = error_of(countdown);
    });
    EXPECT_NE(err.find("nest too deeply for this thread's stack"), std::string::npos) << err;
    // The recursion limit itself fits (in 512 KiB too, but not with a sanitizer's larger frames).
    if (stack > (size_t{1} << 20)) EXPECT_EQ(ok, "");
  }
}

TEST(JinjaSandbox, ContainersAreImmutable) {
  // ImmutableSandboxedEnvironment semantics: mutating methods are unsafe attributes.
  std::string err = error_of("{% set l = [1] %}{{ l.append(2) }}");
  EXPECT_NE(err.find("access to attribute 'append' of 'list' object is unsafe."), std::string::npos)
      << err;
  err = error_of("{% set d = {} %}{{ d.update({'a': 1}) }}");
  EXPECT_NE(err.find("access to attribute 'update' of 'dict' object is unsafe."), std::string::npos)
      << err;
  EXPECT_EQ(render("{% set l = [1] %}{{ l.append is defined }}"), "False");
}

// ---- options and API ---------------------------------------------------------------------------

TEST(JinjaOptionsTest, WhitespaceOptions) {
  JinjaOptions plain;
  plain.trim_blocks = false;
  plain.lstrip_blocks = false;
  EXPECT_EQ(render("  {% if true %}\n  x\n  {% endif %}\nend\n", ojson::object(), plain),
            "  \n  x\n  \nend");
  JinjaOptions keep;
  keep.keep_trailing_newline = true;
  EXPECT_EQ(render("a\n{% if true %}\nb\n{% endif %}\n", ojson::object(), keep), "a\nb\n");
  // \r\n and \r are normalized to \n like jinja2 does.
  EXPECT_EQ(render("a\r\nb\rc\r\n", ojson::object(), keep), "a\nb\nc\n");
}

TEST(JinjaOptionsTest, StrftimeNowUsesFixedTime) {
  JinjaOptions opts;
  opts.now = 1699956800;  // 2023-11-14 10:13:20 UTC: the same date in every time zone
  EXPECT_EQ(render("{{ strftime_now('%d %b %Y') }}", ojson::object(), opts), "14 Nov 2023");
  EXPECT_EQ(render("{{ strftime_now('%Y-%m-%d') }}", ojson::object(), opts), "2023-11-14");
  EXPECT_EQ(render("{{ strftime_now('%Y')|length }}"), "4");  // the real clock
}

TEST(JinjaApi, ContextKinds) {
  // nlohmann::json sorts object keys; ordered_json keeps them like a Python dict.
  const char* doc = R"({"tool": {"name": "f", "description": "d", "arguments": {}}})";
  EXPECT_EQ(render("{{ tool|tojson }}", ojson::parse(doc)),
            R"({"name": "f", "description": "d", "arguments": {}})");
  EXPECT_EQ(JinjaTemplate("{{ tool|tojson }}").render(nlohmann::json::parse(doc)),
            R"({"arguments": {}, "description": "d", "name": "f"})");
  EXPECT_EQ(JinjaTemplate("{{ x }}").render(nlohmann::json()), "");
  EXPECT_THROW(JinjaTemplate("{{ x }}").render(nlohmann::json::array()), Error);
  // JSON numbers keep their Python types.
  EXPECT_EQ(render("{{ a }} {{ b }} {{ c }} {{ d }}",
                   ojson::parse(R"({"a": 1, "b": 1.0, "c": 1e100, "d": 18446744073709551615})")),
            "1 1.0 1e+100 1.8446744073709552e+19");
}

TEST(JinjaApi, InvalidUtf8PassesThroughUnchanged) {
  ojson ctx;
  ctx["s"] = std::string(
      "a\xff"
      "b");
  EXPECT_EQ(JinjaTemplate("{{ s }}|{{ s|upper }}|{{ s[::-1] }}|{{ s|length }}").render(ctx),
            "a\xff"
            "b|A\xff"
            "B|b\xff"
            "a|3");
}

TEST(JinjaApi, ConcurrentRendersShareOneTemplate) {
  const JinjaTemplate tmpl(
      "{% set ns = namespace(n=0) %}{% for i in range(k) %}{% set ns.n = ns.n + i %}{% endfor %}"
      "{{ ns.n }}");
  std::vector<std::thread> threads;
  std::vector<std::string> results(8);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < 50; ++r) results[t] = tmpl.render(ojson{{"k", 100 + t}});
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 8; ++t) {
    int k = 100 + t;
    EXPECT_EQ(results[t], std::to_string(k * (k - 1) / 2));
  }
}

}  // namespace
}  // namespace kiln
