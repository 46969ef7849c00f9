-- wrk script of tally-bench: POST /increments with a JSON array of ITEMS increments.
--
-- Arguments (after `--`): KEYSPACE ITEMS DURATION_S TAIL_S
-- Each thread builds BODIES bodies once (keys uniform over k0 .. k<KEYSPACE-1>, every
-- item's value 1) and the same bodies with value 0 for the tail, then cycles through them,
-- so wrk spends its time sending rather than building JSON. See increment.lua for the tail.

local ffi_ok, ffi = pcall(require, "ffi")
local now
if ffi_ok then
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } tally_bench_timespec;
    int clock_gettime(int clk_id, tally_bench_timespec *tp);
  ]]
  local ts = ffi.new("tally_bench_timespec")
  now = function()
    ffi.C.clock_gettime(1, ts)
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
  end
else
  now = os.time
end

local BODIES = 16
local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

local function build(keyspace, items, value)
  local parts = {}
  for i = 1, items do
    parts[i] = '{"key":"k' .. math.random(0, keyspace - 1) .. '","value":' .. value .. '}'
  end
  return "[" .. table.concat(parts, ",") .. "]"
end

function init(args)
  local keyspace = tonumber(args[1])
  items = tonumber(args[2])
  local duration = tonumber(args[3])
  local tail = tonumber(args[4])
  switch_at = duration > 0 and (now() + duration - tail) or 0
  sent1, sent0 = 0, 0
  -- wrk calls request() once on the first thread to check the script, and throws that
  -- request away: it must post 0 and count as nothing.
  uncounted = (id == 1) and 1 or 0
  math.randomseed(id * 7919 + os.time())
  local headers = { ["Content-Type"] = "application/json" }
  ones, zeros = {}, {}
  for i = 1, BODIES do
    ones[i] = wrk.format("POST", nil, headers, build(keyspace, items, 1))
    zeros[i] = wrk.format("POST", nil, headers, build(keyspace, items, 0))
  end
  n = 0
end

function request()
  n = n % BODIES + 1
  if uncounted > 0 then
    uncounted = uncounted - 1
    return zeros[n]
  end
  if switch_at > 0 and now() < switch_at then
    sent1 = sent1 + 1
    return ones[n]
  end
  switch_at = 0
  sent0 = sent0 + 1
  return zeros[n]
end

function done(summary, latency, requests)
  local s1, s0 = 0, 0
  local items = threads[1] and threads[1]:get("items") or 0
  for _, t in ipairs(threads) do
    s1 = s1 + t:get("sent1")
    s0 = s0 + t:get("sent0")
  end
  local e = summary.errors
  io.write(string.format(
    'TALLYBENCH {"sent1":%d,"sent0":%d,"items_per_request":%d,"requests":%d,"duration_us":%d,' ..
    '"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    s1, s0, items, summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
