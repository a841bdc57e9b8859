/**
 * Install this package's locked dependencies into its own node_modules when they are
 * missing or older than package-lock.json; `prepare` then builds dist/ with them.
 *
 * `npm install <this folder>` links the folder without installing its dependencies, yet
 * runs `prepare` here: the build needs TypeScript, and the linked dist/ resolves
 * openapi-fetch from this folder, not from the project that installed it.
 */

import { spawnSync } from "node:child_process";
import { statSync } from "node:fs";

function modifiedMs(path) {
  try {
    return statSync(path).mtimeMs;
  } catch {
    return undefined;
  }
}

const installed = modifiedMs("node_modules/.package-lock.json");
if (installed === undefined || installed < modifiedMs("package-lock.json")) {
  // --include=dev: the compiler is a devDependency, even under NODE_ENV=production.
  // --ignore-scripts: `npm ci` would run `prepare` again, which is what runs this.
  const args = ["ci", "--include=dev", "--ignore-scripts", "--no-audit", "--no-fund"];
  // npm_execpath is the npm running `prepare`: the same npm, also where `npm` is not on PATH.
  const npm = process.env.npm_execpath;
  const result = npm
    ? spawnSync(process.execPath, [npm, ...args], { stdio: "inherit" })
    : spawnSync("npm", args, { stdio: "inherit", shell: process.platform === "win32" });
  if (result.status !== 0) {
    console.error("could not install the client's build tools (npm ci)");
    process.exit(result.status ?? 1);
  }
}
