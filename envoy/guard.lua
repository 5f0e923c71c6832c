-- jobwire's request guard: a REST request means exactly what it says, or it is refused.
--
-- Runs before the transcoder, which on its own lets a query parameter set any field (even
-- one the path binds: `/q/a?queue=b` would be queue b), drops unknown JSON fields without a
-- word, and parses a `text/plain` or form body as JSON (a "simple request" any web page may
-- send cross-origin without a preflight). jobwire.envoy.guard prepends the tables this code
-- reads, generated from the descriptor set:
--   ROUTES:   {verb, pattern, method, deny = {field = true}, body = message or nil, raw = bool}
--             deny: names a query parameter may not use (path-bound fields, the body field);
--             body: the request message when the body is `*` (JSON); raw: body is bytes.
--   MESSAGES: message -> {json or proto field name -> message name | {__map = value} | true}
--             (true: a value taken as it comes: scalars, enums, google.protobuf.*).
--   ORIGINS:  nil (any origin) or {origin = true}: the only origins that may call.
-- Any error inside the checks refuses the request: this filter fails closed.

local MAX_DEPTH = 100

local function quote(text)
  return '"' .. text:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
end

local function refuse(handle, status, code, message)
  handle:respond(
    {[":status"] = tostring(status), ["content-type"] = "application/json"},
    '{"code":' .. code .. ',"message":' .. quote(message) .. ',"details":[]}')
end

local Refusal = {}

local function fail(status, code, message)
  error(setmetatable({status = status, code = code, message = message}, Refusal), 0)
end

local function invalid(message) fail(400, 3, message) end

-- JSON: only the keys of objects are checked (the transcoder checks the rest of the syntax).

local skip_value

local function skip_space(s, i)
  local j = s:find("[^ \t\r\n]", i)
  if j == nil then invalid("the JSON body ends too early") end
  return j
end

local function skip_string(s, i)
  local j = i + 1
  while true do
    j = s:find('["\\]', j)
    if j == nil then invalid("the JSON body has an unterminated string") end
    if s:byte(j) == 34 then return j + 1 end
    j = j + 2
  end
end

local function field_of(schema, key, where)
  if schema == true then return true end
  local field = schema[key]
  if field == nil or key:find("\\", 1, true) then
    invalid("unknown field `" .. where .. key .. "` in the JSON body")
  end
  if type(field) == "string" then return MESSAGES[field] end
  return field
end

local function skip_object(s, i, schema, where, depth)
  i = skip_space(s, i + 1)
  if s:byte(i) == 125 then return i + 1 end
  while true do
    if s:byte(i) ~= 34 then invalid("the JSON body has a malformed object") end
    local after = skip_string(s, i)
    local key = s:sub(i + 1, after - 2)
    local value_schema
    if type(schema) == "table" and schema.__map ~= nil then
      value_schema = schema.__map == true or MESSAGES[schema.__map]
    else
      value_schema = field_of(schema, key, where)
    end
    i = skip_space(s, after)
    if s:byte(i) ~= 58 then invalid("the JSON body has a malformed object") end
    i = skip_space(s, skip_value(s, skip_space(s, i + 1), value_schema, where .. key .. ".", depth + 1))
    if s:byte(i) == 125 then return i + 1 end
    if s:byte(i) ~= 44 then invalid("the JSON body has a malformed object") end
    i = skip_space(s, i + 1)
  end
end

local function skip_array(s, i, schema, where, depth)
  i = skip_space(s, i + 1)
  if s:byte(i) == 93 then return i + 1 end
  local n = 0
  while true do
    local item = where:sub(1, -2) .. "[" .. n .. "]."
    i = skip_space(s, skip_value(s, i, schema, item, depth + 1))
    if s:byte(i) == 93 then return i + 1 end
    if s:byte(i) ~= 44 then invalid("the JSON body has a malformed array") end
    i = skip_space(s, i + 1)
    n = n + 1
  end
end

skip_value = function(s, i, schema, where, depth)
  if depth > MAX_DEPTH then invalid("the JSON body is nested too deeply") end
  local c = s:byte(i)
  if c == 123 then return skip_object(s, i, schema, where, depth) end
  if c == 91 then return skip_array(s, i, schema, where, depth) end
  if c == 34 then return skip_string(s, i) end
  local j = s:find("[,}%] \t\r\n]", i)
  return j or #s + 1
end

local function check_body(handle, route)
  local buffer = handle:body()
  local text = buffer and buffer:getBytes(0, buffer:length()) or ""
  if text:find("^[ \t\r\n]*$") then return end
  local i = skip_space(text, 1)
  if text:byte(i) ~= 123 then invalid("the body must be a JSON object") end
  i = skip_value(text, i, MESSAGES[route.body], "", 0)
  if text:find("[^ \t\r\n]", i) then invalid("the JSON body has data after its end") end
end

-- The query: a parameter may set only what neither the path nor the body sets.

local function unescape(text)
  return (text:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

local function check_query(route, query)
  for pair in query:gmatch("[^&]+") do
    local name = unescape(pair:match("^[^=]*"))
    local top = name:match("^[^.]*")
    if route.deny[top] then
      invalid("query parameter `" .. name .. "` may not set a field the path or body sets")
    end
    if route.body then
      invalid("query parameter `" .. name .. "`: this route takes its fields from the JSON body only")
    end
  end
end

local function check_content_type(route, headers)
  if route.raw or route.verb == "GET" then return end
  local given = headers:get("content-type")
  local media = given and given:match("^[ \t]*([^;, \t]*)"):lower()
  if media == "application/json" then return end
  if media == nil and (route.body == nil or (headers:get("content-length") or "0") == "0") then return end
  fail(415, 3, "this route accepts only `content-type: application/json`, not `" .. (given or "") .. "`")
end

local function match_route(verb, path)
  for _, route in ipairs(ROUTES) do
    if route.verb == verb and path:find(route.pattern) then return route end
  end
  return nil
end

local function check(handle)
  local headers = handle:headers()
  local origin = headers:get("origin")
  if ORIGINS ~= nil and origin ~= nil and not ORIGINS[origin] then
    fail(403, 7, "requests from origin " .. origin .. " are not allowed")
  end
  local content_type = headers:get("content-type") or ""
  if content_type:sub(1, 16) == "application/grpc" then return end
  local full = headers:get(":path")
  local path, query = full:match("^([^?]*)%??(.*)$")
  local route = match_route(headers:get(":method"), path)
  -- The check filter after the transcoder refuses a request it rewrote to another method.
  handle:streamInfo():dynamicMetadata():set("jobwire.guard", "method", route and route.method or path)
  if route == nil then return end
  check_query(route, query)
  check_content_type(route, headers)
  if route.body then check_body(handle, route) end
end

function envoy_on_request(handle)
  local ok, err = pcall(check, handle)
  if ok then return end
  if getmetatable(err) == Refusal then
    refuse(handle, err.status, err.code, err.message)
  else
    handle:logErr("jobwire guard: " .. tostring(err))
    refuse(handle, 400, 3, "the request could not be checked")
  end
end
