-- wrk script: POST one prepared decode request over and over.
-- usage: wrk -t1 -c64 -d5s -s bench/wrk_post.lua http://HOST:PORT/ -- BODY_FILE 'PATH?QUERY'
-- Prints one line "WRKJSON {...}" with counts, errors and latency percentiles (us).

local req

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local body = f:read("*a")
  f:close()
  req = wrk.format("POST", args[2], {
    ["Content-Type"] = "tensor/binary",
    ["Accept"] = "tensor/binary",
  }, body)
end

function request()
  return req
end

function done(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,'
      .. '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
