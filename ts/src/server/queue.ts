/**
 * A model's job queue with fair scheduling: one FIFO per principal (API key), served round-robin, so a
 * user with many queued jobs cannot starve the others.
 */
export class FairQueue<T extends { owner: string }> {
  private readonly lanes = new Map<string, T[]>();
  /** owners in service order; the next pop starts at `turn` */
  private order: string[] = [];
  private turn = 0;
  private count = 0;

  get length(): number {
    return this.count;
  }

  push(item: T): void {
    let lane = this.lanes.get(item.owner);
    if (!lane) {
      lane = [];
      this.lanes.set(item.owner, lane);
      this.order.push(item.owner);
    }
    lane.push(item);
    this.count++;
  }

  /** The next item, taking owners in turn. */
  pop(): T | undefined {
    if (this.count === 0) return undefined;
    for (let i = 0; i < this.order.length; i++) {
      const idx = (this.turn + i) % this.order.length;
      const owner = this.order[idx]!;
      const lane = this.lanes.get(owner)!;
      const item = lane.shift();
      if (!item) continue;
      this.count--;
      if (lane.length === 0) {
        this.lanes.delete(owner);
        this.order.splice(idx, 1);
        this.turn = this.order.length ? idx % this.order.length : 0;
      } else {
        this.turn = (idx + 1) % this.order.length;
      }
      return item;
    }
    return undefined;
  }

  /** Remove an item (cancellation); true when it was queued. */
  remove(item: T): boolean {
    const lane = this.lanes.get(item.owner);
    const i = lane ? lane.indexOf(item) : -1;
    if (!lane || i < 0) return false;
    lane.splice(i, 1);
    this.count--;
    if (lane.length === 0) {
      const idx = this.order.indexOf(item.owner);
      this.lanes.delete(item.owner);
      this.order.splice(idx, 1);
      if (this.turn > idx) this.turn--;
      if (this.turn >= this.order.length) this.turn = 0;
    }
    return true;
  }

  /** Up to `limit` queued items (lane by lane), e.g. to tell waiting jobs their new position. */
  some(limit: number): T[] {
    const out: T[] = [];
    for (const l of this.lanes.values()) {
      for (const x of l) {
        if (out.length >= limit) return out;
        out.push(x);
      }
    }
    return out;
  }

  /** How many jobs would be served before this one (an estimate under round-robin). */
  position(item: T): number {
    const lane = this.lanes.get(item.owner);
    const k = lane ? lane.indexOf(item) : -1;
    if (k < 0) return 0;
    let ahead = 0;
    for (const l of this.lanes.values()) ahead += Math.min(l.length, l === lane ? k : k + 1);
    return ahead;
  }
}
