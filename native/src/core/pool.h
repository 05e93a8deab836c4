// pool.h: what the executor tells the thread pool (threadpool.cpp), so the pool's workers stop spinning
// once the executor has nothing left and are back as soon as it has work again (see spin.h).
//
// Workers spin only from their own last parallel region (not through every single-threaded op the executor
// runs): on a 2-core machine a worker spinning through a long stretch of single-threaded ops takes the core
// the JS thread needs to record the next ones.
#pragma once

namespace nx {

// The executor is about to sleep (nothing queued, its own spin ran out): spinning workers sleep too.
void pool_executor_idle();
// The executor woke up with work: wake sleeping workers now, so their wake-up latency overlaps the
// executor's instead of starting only when the next kernel calls parallel_for.
void pool_executor_awake();

}  // namespace nx
