-- POST the v2 JSON request in $WRK_BODY to the URL given to wrk, e.g.
--   WRK_BODY=request.json wrk -t1 -c64 -d10s --latency -s benchmarks/wrk_post.lua \
--       http://127.0.0.1:8000/v2/models/mlp-onnx/infer
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
wrk.headers["Content-Type"] = "application/json"
f:close()
