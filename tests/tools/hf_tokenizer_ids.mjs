// Token ids of a corpus from the JavaScript engine @lenml/tokenizers (a transformers.js fork), for
// tests/hf_tokenizer_test.cpp, which compares them with lminv's own encoding of the same tokenizer.json files.
//
//   node tests/tools/hf_tokenizer_ids.mjs ENGINE_DIR CORPUS.jsonl OUT.jsonl TOKENIZER_DIR [TOKENIZER_DIR ...]
//
// ENGINE_DIR is the @lenml/tokenizers package folder (scripts/fetch-hf-tokenizers.sh puts it in
// data/tokenizers/js/node_modules/@lenml/tokenizers). Each TOKENIZER_DIR holds tokenizer.json and
// tokenizer_config.json; the engine is built from them exactly as the @lenml/tokenizer-* packages build it.
// Each corpus line is a JSON object with a "text". OUT gets one JSON line per (tokenizer, corpus line):
//   {"tokenizer": i, "line": n, "ids": [...], "ids_onig": [...], "with_special": [...], "decoded": "..."}
//   ids           encode(text, {add_special_tokens: false}) with the engine as shipped
//   ids_onig      the same after rewriting the engine's pre-tokenizer regexes to the semantics of Oniguruma, the
//                 regex engine of Hugging Face's Rust tokenizers (see onigPattern below); equal to ids except on
//                 the few characters where JavaScript's RegExp differs
//   with_special  encode(text) with special tokens (what the post-processor adds), onig regexes
//   decoded       decode(ids_onig, {skip_special_tokens: false, clean_up_tokenization_spaces: false})
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [engineDir, corpusPath, outPath, ...tokenizerDirs] = process.argv.slice(2);
if (!engineDir || !corpusPath || !outPath || tokenizerDirs.length === 0) {
  console.error("usage: node hf_tokenizer_ids.mjs ENGINE_DIR CORPUS.jsonl OUT.jsonl TOKENIZER_DIR [...]");
  process.exit(2);
}
const engine = await import(pathToFileURL(path.join(engineDir, "dist", "main.mjs")).href);
const { TokenizerLoader } = engine;

// Oniguruma's \s is U+0009..U+000D, U+0085 and the separators (Zs, Zl, Zp); JavaScript's lacks U+0085 and adds
// U+FEFF. Oniguruma's (?i:'s) also matches 'ſ (U+017F folds to s), which the engine's rewrite to [sS] misses.
const ONIG_SPACE = "\\t-\\r\\x85\\p{Zs}\\u2028\\u2029";
function onigPattern(source) {
  let out = "";
  let inClass = false;
  for (let i = 0; i < source.length; ++i) {
    const c = source[i];
    if (c === "\\" && i + 1 < source.length) {
      const e = source[i + 1];
      ++i;
      if (e === "s") out += inClass ? ONIG_SPACE : `[${ONIG_SPACE}]`;
      else if (e === "S" && !inClass) out += `[^${ONIG_SPACE}]`;
      else if (e === "S") throw new Error(`\\S inside a class: ${source}`);
      else out += "\\" + e;
      continue;
    }
    if (c === "[" && !inClass) inClass = true;
    else if (c === "]" && inClass) inClass = false;
    out += c;
  }
  return out.replaceAll("[sS]", "[sS\\u017F]");
}

function patchRegexes(pre) {
  if (!pre) return;
  if (Array.isArray(pre.tokenizers)) pre.tokenizers.forEach(patchRegexes);  // PreTokenizerSequence
  if (pre.pattern instanceof RegExp) pre.pattern = new RegExp(onigPattern(pre.pattern.source), pre.pattern.flags);
}

function load(dir, onig) {
  const tokenizerJSON = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer.json"), "utf8"));
  const configPath = path.join(dir, "tokenizer_config.json");
  const tokenizerConfig = fs.existsSync(configPath) ? JSON.parse(fs.readFileSync(configPath, "utf8")) : {};
  const tokenizer = TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig });
  if (onig) patchRegexes(tokenizer.pre_tokenizer);
  return tokenizer;
}

const texts = fs
  .readFileSync(corpusPath, "utf8")
  .split("\n")
  .filter((line) => line.trim() !== "")
  .map((line) => JSON.parse(line).text);

const out = [];
tokenizerDirs.forEach((dir, t) => {
  const shipped = load(dir, false);
  const onig = load(dir, true);
  texts.forEach((text, n) => {
    const ids = shipped.encode(text, { add_special_tokens: false });
    const idsOnig = onig.encode(text, { add_special_tokens: false });
    const withSpecial = onig.encode(text, { add_special_tokens: true });
    const decoded =
      idsOnig.length === 0
        ? ""
        : onig.decode(idsOnig, { skip_special_tokens: false, clean_up_tokenization_spaces: false });
    out.push(JSON.stringify({ tokenizer: t, line: n, ids, ids_onig: idsOnig, with_special: withSpecial, decoded }));
  });
});
fs.writeFileSync(outPath, out.join("\n") + "\n");
