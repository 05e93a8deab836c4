#!/usr/bin/env node
/** `nnsight` command line: `nnsight info`, more subcommands as the service lands. */
import { LanguageModel, memory } from "../index.js";
import { SERVE_USAGE, serveCommand, statusCommand } from "../server/cli.js";

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case "info": {
      const model = await LanguageModel.load(rest[0] ?? "stories260K");
      console.log(JSON.stringify({ dir: model.dir, config: model.spec.raw, memory: memory() }, null, 2));
      await model.dispose();
      return 0;
    }
    case "serve":
      return serveCommand(rest);
    case "status":
      return statusCommand(rest[0]);
    default:
      console.error(`usage: nnsight info [model]\n       nnsight status URL\n${SERVE_USAGE.replace("usage: ", "       ")}`);
      return cmd ? 2 : 0;
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e) => {
    console.error(e instanceof Error ? `${(e as { code?: string }).code ?? "ERROR"}: ${e.message}` : e);
    process.exit(1);
  },
);
