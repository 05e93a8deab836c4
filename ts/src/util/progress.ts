/**
 * A one-line progress bar on stderr, shown only on a TTY (never in pipes, CI or tests), e.g.
 * `loading weights  ████████░░░░  120/291`.
 */
export interface Progress {
  update(done: number, total: number, label?: string): void;
  done(): void;
}

const enabled = (): boolean => !!process.stderr.isTTY && !process.env.CI && !process.env.NX_QUIET && !process.env.VITEST;

export function progress(title: string): Progress {
  if (!enabled()) return { update() {}, done() {} };
  let last = 0;
  let shown = false;
  return {
    update(done, total, label = "") {
      const now = Date.now();
      if (now - last < 80 && done < total) return;
      last = now;
      shown = true;
      const width = 24;
      const f = total > 0 ? Math.min(1, done / total) : 0;
      const bar = "█".repeat(Math.round(f * width)).padEnd(width, "░");
      const text = `${title}  ${bar}  ${done}/${total} ${label}`.slice(0, (process.stderr.columns || 100) - 1);
      process.stderr.write(`\r\x1b[2K${text}`);
    },
    done() {
      if (shown) process.stderr.write("\r\x1b[2K");
    },
  };
}
