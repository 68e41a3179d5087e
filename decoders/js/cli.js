#!/usr/bin/env node
// node cli.js FILE...: decode each v2 payload file and print its JSON on one line (docs/wire-format.md).
// A file that does not decode prints {"file": ..., "error": ...} and the exit status is 1.

import { readFileSync } from "node:fs";
import { decodeBatch } from "./index.js";

let status = 0;
for (const file of process.argv.slice(2)) {
  try {
    process.stdout.write(JSON.stringify(decodeBatch(readFileSync(file))) + "\n");
  } catch (err) {
    process.stdout.write(JSON.stringify({ file, error: err.message }) + "\n");
    status = 1;
  }
}
process.exitCode = status;
