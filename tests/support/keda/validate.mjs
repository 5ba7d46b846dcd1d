// Validate ScaledObjects (JSON documents, one per line on stdin) against KEDA's schema.
// Prints "ok" or the schema errors, one line per document; exits 1 if any is invalid.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { createInterface } from "node:readline";

let failed = false;
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  try {
    new ScaledObject(JSON.parse(line)).validate();
    console.log("ok");
  } catch (error) {
    failed = true;
    console.log(String(error.message ?? error).replace(/\s+/g, " "));
  }
}
process.exit(failed ? 1 : 0);
