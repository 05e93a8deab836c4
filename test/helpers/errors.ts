// Shared by the test suites: the NNsightError code a promise rejects with.
import { expect } from "vitest";

import { NNsightError } from "../../ts/src/index.js";

/** The code of the NNsightError `p` rejects with; fails the test if it resolves or throws anything else. */
export async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(NNsightError);
    return (e as NNsightError).code;
  }
  throw new Error("expected an error");
}
