/** Service metrics in the Prometheus text format (`GET /metrics`). */

const BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];

class Histogram {
  readonly counts = new Array<number>(BUCKETS.length).fill(0);
  sum = 0;
  n = 0;
  observe(seconds: number): void {
    this.n++;
    this.sum += seconds;
    for (let i = 0; i < BUCKETS.length; i++) if (seconds <= BUCKETS[i]!) this.counts[i]!++;
  }
  render(name: string, labels: string): string[] {
    const l = labels ? `${labels},` : "";
    const lines = BUCKETS.map((b, i) => `${name}_bucket{${l}le="${b}"} ${this.counts[i]}`);
    lines.push(`${name}_bucket{${l}le="+Inf"} ${this.n}`, `${name}_sum${labels ? `{${labels}}` : ""} ${this.sum}`, `${name}_count${labels ? `{${labels}}` : ""} ${this.n}`);
    return lines;
  }
}

const esc = (s: string) => s.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");

export class Metrics {
  /** finished jobs by model and final state */
  private readonly finished = new Map<string, number>();
  private readonly rejected = new Map<string, number>();
  private readonly wait = new Map<string, Histogram>();
  private readonly run = new Map<string, Histogram>();
  /** per model: batches of 2+ jobs handed to a worker at once, and the jobs in them */
  private readonly batches = new Map<string, { batches: number; jobs: number; shared: number }>();
  bytesIn = 0;
  bytesOut = 0;
  workerRestarts = 0;

  jobFinished(model: string, state: string): void {
    const k = `model="${esc(model)}",state="${state}"`;
    this.finished.set(k, (this.finished.get(k) ?? 0) + 1);
  }
  jobRejected(code: string): void {
    this.rejected.set(code, (this.rejected.get(code) ?? 0) + 1);
  }
  batchDispatched(model: string, jobs: number): void {
    const b = this.batch(model);
    b.batches++;
    b.jobs += jobs;
  }
  /** a job completed that ran in a forward pass shared with other jobs */
  sharedPass(model: string): void {
    this.batch(model).shared++;
  }
  private batch(model: string): { batches: number; jobs: number; shared: number } {
    let b = this.batches.get(model);
    if (!b) this.batches.set(model, (b = { batches: 0, jobs: 0, shared: 0 }));
    return b;
  }
  observeWait(model: string, seconds: number): void {
    hist(this.wait, model).observe(seconds);
  }
  observeRun(model: string, seconds: number): void {
    hist(this.run, model).observe(seconds);
  }

  render(gauges: { model: string; queued: number; running: number }[]): string {
    const out: string[] = [];
    out.push("# HELP nnsight_jobs Jobs by state (QUEUED and RUNNING now; COMPLETED, ERROR, CANCELLED since start).", "# TYPE nnsight_jobs gauge");
    for (const g of gauges) {
      out.push(`nnsight_jobs{model="${esc(g.model)}",state="QUEUED"} ${g.queued}`, `nnsight_jobs{model="${esc(g.model)}",state="RUNNING"} ${g.running}`);
    }
    for (const [k, v] of this.finished) out.push(`nnsight_jobs{${k}} ${v}`);
    out.push("# HELP nnsight_requests_rejected_total Submissions refused before queuing, by error code.", "# TYPE nnsight_requests_rejected_total counter");
    for (const [k, v] of this.rejected) out.push(`nnsight_requests_rejected_total{code="${k}"} ${v}`);
    out.push("# HELP nnsight_queue_wait_seconds Time from submission to start.", "# TYPE nnsight_queue_wait_seconds histogram");
    for (const [m, h] of this.wait) out.push(...h.render("nnsight_queue_wait_seconds", `model="${esc(m)}"`));
    out.push("# HELP nnsight_run_seconds Time a job ran on its worker.", "# TYPE nnsight_run_seconds histogram");
    for (const [m, h] of this.run) out.push(...h.render("nnsight_run_seconds", `model="${esc(m)}"`));
    out.push("# HELP nnsight_batches_total Batches of plain traces handed to a worker at once (2 or more jobs; those of equal row lengths share a forward pass).", "# TYPE nnsight_batches_total counter");
    for (const [m, b] of this.batches) out.push(`nnsight_batches_total{model="${esc(m)}"} ${b.batches}`);
    out.push("# HELP nnsight_batched_jobs_total Jobs handed to a worker in such batches.", "# TYPE nnsight_batched_jobs_total counter");
    for (const [m, b] of this.batches) out.push(`nnsight_batched_jobs_total{model="${esc(m)}"} ${b.jobs}`);
    out.push("# HELP nnsight_shared_pass_jobs_total Jobs completed that ran in a forward pass shared with other jobs (each on its own rows).", "# TYPE nnsight_shared_pass_jobs_total counter");
    for (const [m, b] of this.batches) out.push(`nnsight_shared_pass_jobs_total{model="${esc(m)}"} ${b.shared}`);
    out.push("# HELP nnsight_bytes_in_total Bytes received over WebSockets.", "# TYPE nnsight_bytes_in_total counter", `nnsight_bytes_in_total ${this.bytesIn}`);
    out.push("# HELP nnsight_bytes_out_total Bytes sent over WebSockets.", "# TYPE nnsight_bytes_out_total counter", `nnsight_bytes_out_total ${this.bytesOut}`);
    out.push("# HELP nnsight_worker_restarts_total Model workers restarted after a crash, kill or cancellation.", "# TYPE nnsight_worker_restarts_total counter", `nnsight_worker_restarts_total ${this.workerRestarts}`);
    return out.join("\n") + "\n";
  }
}

function hist(m: Map<string, Histogram>, k: string): Histogram {
  let h = m.get(k);
  if (!h) m.set(k, (h = new Histogram()));
  return h;
}
