-- wrk script: one fixed request, non-2xx answers counted, one JSON summary line.
-- Arguments after `--`: METHOD PATH [BODY_FILE|-] [CONTENT_TYPE]
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local method, path = args[1], args[2]
  local body = nil
  local headers = {}
  if args[3] and args[3] ~= "-" then
    local file = assert(io.open(args[3], "rb"))
    body = file:read("*a")
    file:close()
    headers["Content-Type"] = args[4] or "text/xml; charset=utf-8"
  end
  non2xx = 0
  prepared = wrk.format(method, path, headers, body)
end

function request()
  return prepared
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("non2xx")
  end
  local e = summary.errors
  io.write(string.format(
    'LOAD_RESULT {"requests": %d, "duration_us": %d, "non2xx": %d, "connect_errors": %d, '
      .. '"read_errors": %d, "write_errors": %d, "timeouts": %d, '
      .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, bad, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
