/**
 * nnsight for TypeScript: read and edit any activation of a language model, locally on our native
 * runtime or remotely on a shared server.
 */
export { NNsightError, ERROR_CODES, type ErrorCode } from "./errors.js";
export {
  Tensor,
  tensor,
  empty,
  scope,
  keep,
  memory,
  sync,
  setNumThreads,
  getNumThreads,
  DTYPES,
  type DType,
  type Device,
  type CudaInfo,
  cudaAvailable,
  cudaInfo,
  type Index,
  type TensorLike,
} from "./tensor/index.js";
export { loadSafetensors, saveSafetensors } from "./tensor/safetensors.js";
export { LanguageModel, type LanguageModelOptions, type TraceOptions, type Real, type TraceResult } from "./trace/model.js";
export type { LoadModelOptions } from "./models/causal-lm.js";
export { Communicator, type CommunicatorOptions, type CommBackend } from "./cluster/communicator.js";
export { launchRanks, joinGroup, rankInfo, newGroupName, RankGroup, type LaunchOptions, type RankInfo } from "./cluster/launch.js";
export { shardPlan, type ShardPlan, type WeightSplit } from "./models/tensor-parallel.js";
export { Envoy, EnvoyList, type EnvoyClass, type EnvoyClasses } from "./trace/envoy.js";
export { TracedValue } from "./trace/traced-value.js";
export { Tracer } from "./trace/tracer.js";
export { Tokenizer } from "./models/tokenizer.js";
export type { GenerateOptions } from "./models/generate.js";
export type { PromptInput } from "./models/batch.js";
export { RemoteLanguageModel, type ConnectOptions } from "./remote/client.js";
export { RemoteJob, type JobEvent, type JobStatusInfo } from "./remote/job.js";
export { PROTOCOL_VERSION, type JobState, type ServerLimits } from "./remote/protocol.js";
export { serve, type ServeOptions, type RunningServer } from "./server/http.js";
export { cat, stack, zeros, ones, full, arange, randn, where } from "./trace/functions.js";
