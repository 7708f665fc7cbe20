-- llmesh edge: the two things the gRPC-JSON transcoder cannot do alone for OpenAI clients.
--
-- Requests: OpenAI clients POST /v1/chat/completions and /v1/completions for both the unary and
-- the streaming call; only a top-level `"stream": true` in the body tells them apart. That body
-- is read here, before the transcoder, and a streaming request is sent to the `:stream` path
-- that the streaming RPC is bound to.
--
-- Such a request is marked (`x-llmesh-sse: 1`) so the worker ends its stream with a sentinel
-- message, `{"object":"[DONE]"}`, which is rewritten here into OpenAI's `data: [DONE]`.
--
-- Every request first loses the `x-llmesh-*` headers a client sent: only the platform (auth,
-- the endpoint picker) sets those.
--
-- A JSON body with a top-level field its RPC's request message does not have is refused with
-- 400 naming it, as OpenAI does ("Unrecognized request argument supplied"): the transcoder
-- would drop it silently, and a misspelt `temprature` would go unnoticed. The fields per POST
-- path come from the descriptor set, in the table BODY_FIELDS that the edge's config generator
-- prepends to this script (llmesh.edge.filters.lua_prelude).
--
-- Responses: a failed RPC comes back from the transcoder as a google.rpc.Status JSON body
-- (`{"code":5,"message":"...","details":[]}`); OpenAI clients expect
-- `{"error":{"message","type","code","param"}}`. Only non-2xx JSON responses are read, so
-- streams are never buffered: an SSE stream's chunks pass as they come, only their tails are
-- looked at for the sentinel.

-- POST paths whose body decides between the unary and the streaming RPC.
local STREAM_PATH = {
  ["/v1/chat/completions"] = "/v1/chat/completions:stream",
  ["/v1/completions"] = "/v1/completions:stream",
}
-- The streaming RPCs' own REST paths: a client may POST there directly, and gets SSE as well.
local SSE_PATH = {}
for _, target in pairs(STREAM_PATH) do
  SSE_PATH[target] = true
end

-- gRPC status code -> name, as the error's `code` (the same names stream errors carry).
local GRPC_NAME = {
  [0] = "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
}

-- HTTP status -> OpenAI error type.
local ERROR_TYPE = {
  [400] = "invalid_request_error",
  [401] = "authentication_error",
  [403] = "permission_error",
  [404] = "not_found_error",
  [409] = "conflict_error",
  [413] = "invalid_request_error",
  [422] = "invalid_request_error",
  [429] = "rate_limit_error",
}

local byte, find, sub = string.byte, string.find, string.sub
-- Prepended by the config generator; an empty table when this script runs on its own.
local KNOWN_FIELDS = BODY_FIELDS or {}

local PLATFORM_PREFIX = "x-llmesh-"
-- The worker's last SSE message as the transcoder prints it (only set fields, no whitespace).
local DONE_FRAME = 'data: {"object":"[DONE]"}\n\n'
local DONE = "data: [DONE]\n\n"

-- Drop client-sent x-llmesh-* headers: identity and routing headers are the platform's.
local function strip_platform_headers(headers)
  local found = {}
  for key, _ in pairs(headers) do
    if sub(key, 1, #PLATFORM_PREFIX) == PLATFORM_PREFIX then
      found[#found + 1] = key
    end
  end
  for _, key in ipairs(found) do
    headers:remove(key)
  end
end

-- Index just past the JSON string that starts at s[i] == '"', or nil if it never ends.
local function skip_string(s, i)
  local j = i + 1
  while true do
    local k = find(s, '["\\]', j)
    if k == nil then
      return nil
    end
    if byte(s, k) == 92 then -- backslash: skip the escaped character
      j = k + 2
    else
      return k + 1
    end
  end
end

-- Index just past the JSON value that starts at s[i], or nil if it is cut short. Strings are
-- skipped whole, so braces and quotes inside them do not count.
local function skip_value(s, i)
  local c = byte(s, i)
  if c == 34 then
    return skip_string(s, i)
  end
  if c == 123 or c == 91 then -- { or [
    local depth, j = 0, i
    while true do
      local k = find(s, '["{}%[%]]', j)
      if k == nil then
        return nil
      end
      local d = byte(s, k)
      if d == 34 then
        j = skip_string(s, k)
        if j == nil then
          return nil
        end
      else
        if d == 123 or d == 91 then
          depth = depth + 1
        else
          depth = depth - 1
        end
        j = k + 1
        if depth == 0 then
          return j
        end
      end
    end
  end
  -- a number, true, false or null: up to the next delimiter
  return find(s, "[,}%]%s]", i) or (#s + 1)
end

-- The members of a top-level JSON object, key -> raw value text (a string keeps its quotes),
-- or nil when `s` is not an object. Lenient: the transcoder reports malformed JSON properly.
local function members(s)
  local i = find(s, "%S")
  if i == nil or byte(s, i) ~= 123 then
    return nil
  end
  local out = {}
  i = i + 1
  while true do
    i = find(s, "%S", i)
    if i == nil then
      return nil
    end
    local c = byte(s, i)
    if c == 125 then -- }
      return out
    elseif c == 44 then -- ,
      i = i + 1
    elseif c ~= 34 then
      return nil
    else
      local key_end = skip_string(s, i)
      if key_end == nil then
        return nil
      end
      local key = sub(s, i + 1, key_end - 2)
      i = find(s, "%S", key_end)
      if i == nil or byte(s, i) ~= 58 then -- :
        return nil
      end
      i = find(s, "%S", i + 1)
      if i == nil then
        return nil
      end
      local value_end = skip_value(s, i)
      if value_end == nil then
        return nil
      end
      out[key] = sub(s, i, value_end - 1)
      i = value_end
    end
  end
end

-- Answers 400 naming the body's fields that `known` lacks (sorted) and returns true; false when
-- every field is known. The edge's local-reply mapper wraps the text in OpenAI's error JSON.
local function refuse_unknown_fields(handle, fields, known)
  local unknown = {}
  for key, _ in pairs(fields) do
    if not known[key] then
      unknown[#unknown + 1] = key
    end
  end
  if #unknown == 0 then
    return false
  end
  table.sort(unknown)
  handle:streamInfo():dynamicMetadata():set("llmesh.edge", "error_code", "INVALID_ARGUMENT")
  handle:respond(
    { [":status"] = "400", ["content-type"] = "text/plain" },
    "Unrecognized request argument supplied: " .. table.concat(unknown, ", ")
  )
  return true
end

function envoy_on_request(handle)
  local headers = handle:headers()
  strip_platform_headers(headers)
  local method = headers:get(":method") or ""
  local path = headers:get(":path") or ""
  local metadata = handle:streamInfo():dynamicMetadata()
  -- What the client asked for, for the access log: the transcoder (and the stream routing
  -- below) rewrite both.
  metadata:set("llmesh.edge", "method", method)
  metadata:set("llmesh.edge", "path", path)
  if find(headers:get("content-type") or "", "application/grpc", 1, true) == 1 then
    return -- native gRPC passes through untouched
  end
  -- Marks a plain HTTP request for the edge's JSON local replies (bad JSON, too large, no
  -- upstream); after transcoding its content-type says gRPC too.
  metadata:set("llmesh.edge", "http", true)
  if method == "GET" or method == "HEAD" then
    return
  end
  -- Buffering the whole body enforces the request size limit with a 413 (the per-connection
  -- buffer limit) for every REST route: the transcoder alone would stream an oversized body on.
  local body = handle:body()
  if body == nil or method ~= "POST" then
    return
  end
  local query_at = find(path, "?", 1, true)
  local bare = query_at and sub(path, 1, query_at - 1) or path
  local stream_path = STREAM_PATH[bare]
  local known = KNOWN_FIELDS[bare]
  local fields = nil
  if stream_path ~= nil or known ~= nil then
    fields = members(body:getBytes(0, body:length()))
  end
  if fields ~= nil and known ~= nil and refuse_unknown_fields(handle, fields, known) then
    return
  end
  if stream_path == nil then
    if SSE_PATH[bare] then
      headers = handle:headers()
      headers:replace("x-llmesh-sse", "1")
      handle:streamInfo():dynamicMetadata():set("llmesh.edge", "sse", true)
    end
    return
  end
  if fields ~= nil and fields["stream"] == "true" then
    -- Headers taken before body() are out of scope now: fetch them again.
    local query = query_at and sub(path, query_at) or ""
    headers = handle:headers()
    headers:replace(":path", stream_path .. query)
    headers:replace("x-llmesh-sse", "1")
    handle:streamInfo():dynamicMetadata():set("llmesh.edge", "sse", true)
  end
end

-- OpenAI's chunks always carry `choices`, empty in the usage chunk; the stream routes print only
-- set fields, so a chunk without choices would have none (and clients that iterate over
-- `chunk.choices` would fail): put `"choices":[]` back. Returns nil when no frame needed it.
local function with_choices(text)
  local out, changed, i = {}, false, 1
  while i <= #text do
    local j = find(text, "\n\n", i, true)
    local stop = j and j + 1 or #text
    local frame = sub(text, i, stop)
    if sub(frame, 1, 7) == "data: {" and find(frame, '"choices":', 1, true) == nil then
      local rest = sub(frame, 8)
      frame = 'data: {"choices":[]' .. (byte(rest, 1) == 125 and "" or ",") .. rest
      changed = true
    end
    out[#out + 1] = frame
    i = stop + 1
  end
  return changed and table.concat(out) or nil
end

-- An SSE stream passes chunk by chunk; the chunk that ends with the worker's sentinel frame gets
-- OpenAI's `data: [DONE]` in its place.
local function finish_sse(handle)
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    local text = chunk:getBytes(0, n)
    local done = n >= #DONE_FRAME and sub(text, n - #DONE_FRAME + 1) == DONE_FRAME
    if done then
      text = sub(text, 1, n - #DONE_FRAME)
    end
    local fixed = with_choices(text)
    if done or fixed ~= nil then
      chunk:setBytes((fixed or text) .. (done and DONE or ""))
    end
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = tonumber(headers:get(":status") or "")
  if status == 200 then
    local edge = handle:streamInfo():dynamicMetadata():get("llmesh.edge")
    if edge ~= nil and edge["sse"] then
      finish_sse(handle)
    end
    return
  end
  if status == nil or status < 400 then
    return
  end
  -- Services and the picker put retry hints in `retry-after-ms`; clients that only know
  -- `retry-after` (seconds) get that too.
  local retry_ms = tonumber(headers:get("retry-after-ms") or "")
  if retry_ms ~= nil and headers:get("retry-after") == nil then
    headers:add("retry-after", tostring(math.ceil(retry_ms / 1000)))
  end
  local content_type = headers:get("content-type") or ""
  if find(content_type, "application/json", 1, true) == nil then
    return
  end
  local body = handle:body()
  if body == nil then
    return
  end
  local fields = members(body:getBytes(0, body:length()))
  if fields == nil or fields["error"] ~= nil or fields["code"] == nil then
    return -- not a google.rpc.Status (already OpenAI-shaped, or some other JSON)
  end
  local message = fields["message"]
  if message == nil or byte(message, 1) ~= 34 then
    message = '"request failed with HTTP status ' .. status .. '"'
  end
  local code = GRPC_NAME[tonumber(fields["code"]) or -1] or "UNKNOWN"
  local error_type = ERROR_TYPE[status] or (status >= 500 and "server_error" or "invalid_request_error")
  local reshaped = '{"error":{"message":' .. message .. ',"type":"' .. error_type
    .. '","code":"' .. code .. '","param":null}}'
  body:setBytes(reshaped)
  -- The upstream's status name for the access log (Envoy's own grpc_status field only sees HTTP
  -- statuses once the transcoder has converted the reply).
  handle:streamInfo():dynamicMetadata():set("llmesh.edge", "error_code", code)
  handle:headers():replace("content-length", tostring(#reshaped))
end
