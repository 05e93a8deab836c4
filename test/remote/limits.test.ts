// The run-time limit (TIMEOUT) and the cost estimate checked before queuing, on a server with tight
// limits; the CLI's `status` command against it.
import { execFileSync } from "node:child_process";
import path from "node:path";

import { afterAll, beforeAll, describe, expect, it } from "vitest";

import { LanguageModel, NNsightError, type RemoteLanguageModel, type Tensor } from "../../ts/src/index.js";
import { ROOT, type TestServer, startServer } from "./helpers.js";
import { codeOf } from "../helpers/errors.js";

let server: TestServer;
let remote: RemoteLanguageModel;
const P = "Once upon a time";

beforeAll(async () => {
  server = await startServer(["--job-timeout-ms", "250", "--max-cost", "300000"]);
  remote = await LanguageModel.connect(server.url, "stories260K");
});
afterAll(async () => {
  await remote?.dispose();
  await server?.stop();
});


describe("limits", () => {
  it("a job over the run-time limit is TIMEOUT; the next job runs", async () => {
    const prompts = Array.from({ length: 8 }, (_, i) => `${P} ${i}`);
    const job = await remote.generate(prompts, { maxNewTokens: 480, blocking: false });
    expect(await codeOf(job.result())).toBe("TIMEOUT");
    const r = await remote.trace(P, () => ({ h: remote.model.layers[1]!.output }));
    expect((r.h as Tensor).shape).toEqual([1, 5, 64]);
  });

  it("a graph over the cost limit is refused before it is queued (TOO_LARGE)", async () => {
    const err = await remote.generate(P, { maxNewTokens: 100_000 }).catch((e: NNsightError) => e);
    expect(err).toBeInstanceOf(NNsightError);
    expect((err as NNsightError).code).toBe("TOO_LARGE");
    expect((err as NNsightError).message).toMatch(/cost/);
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    expect(metrics).toMatch(/nnsight_jobs\{model="stories260K",state="TIMEOUT"\} 1/);
    expect(metrics).toMatch(/nnsight_requests_rejected_total\{code="TOO_LARGE"\} 1/);
  });

  it("`nnsight status URL` prints the service's health and models", () => {
    const out = execFileSync(process.execPath, [path.join(ROOT, "dist/cli/main.js"), "status", server.url], { encoding: "utf8" });
    const s = JSON.parse(out) as { status: string; models: Array<{ id: string; status: string }> };
    expect(s.status).toBe("ok");
    expect(s.models[0]).toMatchObject({ id: "stories260K", status: "ready" });
  });
});
