#!/usr/bin/env node
// Writes tests/data/tokenizer_cases.jsonl: GPT-2 token ids for ~40 strings, computed by the npm package
// gpt-3-encoder (a line-by-line port of OpenAI's encoder.py), the reference that host/tokenizer.cpp must match.
//
// Usage: node tools/gen_tokenizer_cases.js [path to the unpacked gpt-3-encoder package]   (default /tmp/npmt/package)
//   e.g. cd /tmp && npm pack gpt-3-encoder@1.1.4 && mkdir npmt && tar -xzf gpt-3-encoder-1.1.4.tgz -C npmt
//
// The strings avoid the few code points on which the two regex engines disagree: JavaScript's \s includes U+FEFF
// but not U+001C..U+001F or U+0085, while the C++ scanner uses Python's str.isspace(), which is the other way
// round; and characters assigned after Unicode 14 (node knows newer Unicode than Python 3.11's tables). Common
// whitespace (space, \t, \n, \r, \v, \f, U+00A0, U+2003, U+3000) is the same in both and is covered.
'use strict';
const fs = require('fs');
const path = require('path');

const packageDir = process.argv[2] || '/tmp/npmt/package';
const { encode, decode } = require(path.resolve(packageDir));

const cases = [
  'The sky is blue.',
  'This is a prompt sentence.',
  // contractions: case-sensitive, so "DON'T" splits differently from "don't"
  "I'm, you're, it's, they'll, we've, he'd, don't",
  "DON'T",
  "She's 'quoted' and rock'n'roll, o'clock",
  "'s't're've'm'll'd",
  // whitespace: runs before words leave their last space to the word; runs at the end stay whole
  'multiple   spaces    here',
  'tab\tseparated\tvalues',
  'a\n\nb',
  '  leading',
  'trailing  ',
  'a \t b',
  'line one\nline two\r\nline three\n',
  '\n\n\n',
  '   ',
  ' ',
  'x\u000b\u000cy',
  'no\u00a0break and em\u2003space and ideographic\u3000space',
  // digits and numbers
  '2024 is 12345 and 3.14',
  'Phone: +1 (555) 010-9999, pi ~ 3.14159265358979',
  '\u00bd \u00b2 \u2163 \u0663\u0664\u0665',  // No, Nl and Arabic-Indic digits are \p{N}
  // punctuation runs
  'Wait... what?!?! (yes) [no] {maybe} <html> --- ***',
  'a+b=c; x->y || z && !w',
  '#include <vector>\nint main() { return 0; }',
  'https://example.com/path?q=1&r=two#frag',
  '"Hello," she said. \u201cCurly quotes\u201d \u2014 dashes \u2013 and \u2026',
  // emoji and symbols
  'I \u2764\ufe0f \ud83e\udd16 and \ud83d\udc68\u200d\ud83d\udc69\u200d\ud83d\udc67',
  '\ud83d\ude00\ud83d\ude00\ud83d\ude00 three smileys',
  '\u00a9 2024 \u2122 \u20ac100 \u00a35',
  // scripts
  '\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8',   // Japanese
  '\u4e2d\u6587\u6d4b\u8bd5',                            // Chinese
  '\ud55c\uad6d\uc5b4 \ud14c\uc2a4\ud2b8',              // Korean
  'Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber Stra\u00dfe',  // accented Latin, precomposed
  'Cafe\u0301 with a combining accent',                 // U+0301 is Mn: not a letter
  '\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645',  // Arabic
  '\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e',  // Devanagari (vowel signs are Mc/Mn)
  '\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!',                 // Cyrillic
  '\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u03ba\u03cc\u03c3\u03bc\u03b5', // Greek
  // mixed
  'GPT-2 \u306f 2019\u5e74\u306b released; \u00e7a marche? \ud83d\ude80 yes!!',
  'The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!',
  'antidisestablishmentarianism supercalifragilisticexpialidocious',
  '<|endoftext|> is plain text here',
];

// The one fact checked by hand against GPT-2's published tokenization.
const sky = encode('The sky is blue.').join(' ');
if (sky !== '464 6766 318 4171 13') throw new Error(`reference encoder gives ${sky} for "The sky is blue."`);

const lines = cases.map((text) => {
  const ids = encode(text);
  if (decode(ids) !== text) throw new Error(`reference round trip fails for ${JSON.stringify(text)}`);
  return JSON.stringify({ text, ids });
});
const out = path.join(__dirname, '..', 'tests', 'data', 'tokenizer_cases.jsonl');
fs.writeFileSync(out, lines.join('\n') + '\n');
console.log(`wrote ${cases.length} cases to ${out}`);
