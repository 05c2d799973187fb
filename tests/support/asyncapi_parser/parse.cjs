// Parses an AsyncAPI document with the official parser and prints what it found, as JSON:
// {"parsed": bool, "version": "...", "diagnostics": [{severity, code, message, path}]}.
// Usage: node parse.cjs <node_modules folder holding @asyncapi/parser> <document>
"use strict";

const fs = require("node:fs");
const path = require("node:path");

async function main() {
  const [modules, file] = process.argv.slice(2);
  const { Parser, DiagnosticSeverity } = require(path.join(modules, "@asyncapi", "parser"));
  const names = Object.fromEntries(
    Object.entries(DiagnosticSeverity)
      .filter(([, value]) => typeof value === "number") // a TypeScript enum maps both ways
      .map(([name, value]) => [value, name.toLowerCase()]),
  );
  const parser = new Parser();
  const { document, diagnostics } = await parser.parse(fs.readFileSync(file, "utf8"), {
    source: path.resolve(file),
  });
  process.stdout.write(
    JSON.stringify({
      parsed: document !== undefined,
      version: require(path.join(modules, "@asyncapi", "parser", "package.json")).version,
      diagnostics: diagnostics.map((d) => ({
        severity: names[d.severity] ?? String(d.severity),
        code: d.code,
        message: d.message,
        path: d.path,
      })),
    }),
  );
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(2);
});
