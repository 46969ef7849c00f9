-- wrk script of tally-bench: POST /increment with {"key":"k<random>","value":V}.
--
-- Arguments (after `--`): KEYSPACE DURATION_S TAIL_S
--   keys are drawn uniformly from k0 .. k<KEYSPACE-1>;
--   for the first DURATION_S - TAIL_S seconds every request posts value 1, then value 0.
--
-- Why the zero tail: wrk stops with up to one request in flight per connection, and the
-- server may have applied a request whose 202 wrk never read. Requests posting 0 cost the
-- same as any other but change no total, so once every connection has cycled through the
-- tail, every value-1 request has been answered: the store must then hold exactly the
-- number of value-1 requests answered 202. `done()` prints the counts for tally-bench.
-- DURATION_S = 0 posts only zeros (warm-up).

local ffi_ok, ffi = pcall(require, "ffi")
local now
if ffi_ok then
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } tally_bench_timespec;
    int clock_gettime(int clk_id, tally_bench_timespec *tp);
  ]]
  local ts = ffi.new("tally_bench_timespec")
  now = function()
    ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
  end
else
  now = os.time -- one-second resolution: the tail then needs to be at least 2 s
end

local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  keyspace = tonumber(args[1])
  local duration = tonumber(args[2])
  local tail = tonumber(args[3])
  switch_at = duration > 0 and (now() + duration - tail) or 0
  sent1, sent0 = 0, 0
  -- wrk calls request() once on the first thread to check the script, and throws that
  -- request away: it must post 0 and count as nothing.
  uncounted = (id == 1) and 1 or 0
  math.randomseed(id * 7919 + os.time())
  headers = { ["Content-Type"] = "application/json" }
  -- TALLY_BENCH_TOKEN (set by tally-bench for its token variant): a bearer token to send.
  local token = os.getenv("TALLY_BENCH_TOKEN")
  if token and #token > 0 then
    headers["Authorization"] = "Bearer " .. token
  end
end

function request()
  local v
  if uncounted > 0 then
    uncounted = uncounted - 1
    v = 0
  elseif switch_at > 0 and now() < switch_at then
    v = 1
    sent1 = sent1 + 1
  else
    v = 0
    sent0 = sent0 + 1
    switch_at = 0
  end
  local body = '{"key":"k' .. math.random(0, keyspace - 1) .. '","value":' .. v .. '}'
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local s1, s0 = 0, 0
  for _, t in ipairs(threads) do
    s1 = s1 + t:get("sent1")
    s0 = s0 + t:get("sent0")
  end
  local e = summary.errors
  io.write(string.format(
    'TALLYBENCH {"sent1":%d,"sent0":%d,"items_per_request":1,"requests":%d,"duration_us":%d,' ..
    '"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    s1, s0, summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
