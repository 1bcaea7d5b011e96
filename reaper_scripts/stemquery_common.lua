-- @noindex
-- stemquery: code shared by the stemquery actions (loaded with dofile; not an action itself).
--
-- REAPER's Lua has no sockets, so the actions talk to `stemquery serve` through its hot folder
-- (docs/hotfolder.md): copy the audio into .tmp/ and rename it into inbox/, then the job file the same way;
-- then a reaper.defer loop follows processing/JOB/status.json and imports done/JOB/result.json's stems.
-- Nothing here blocks REAPER: files are copied a few MB per defer cycle, and there is no os.execute.

local M = {}

M.SECTION = "stemquery"
M.VERSION = "0.1.0"
M.STALE_SECONDS = 10
M.COPY_CHUNK = 4 * 1024 * 1024
M.NOT_RUNNING = "stemquery server is not running: start it with `stemquery serve`"

local SEP = package.config:sub(1, 1)

-- JSON -------------------------------------------------------------------------------------------------------
local function encode_string(s)
  local escaped = s:gsub('[%c"\\]', function(c)
    local named = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }
    return named[c] or string.format("\\u%04x", c:byte())
  end)
  return '"' .. escaped .. '"'
end

function M.json_encode(value)
  local kind = type(value)
  if kind == "nil" then return "null" end
  if kind == "boolean" then return tostring(value) end
  if kind == "number" then
    if value ~= value or value == math.huge or value == -math.huge then return "null" end
    return string.format("%.17g", value)
  end
  if kind == "string" then return encode_string(value) end
  if kind == "table" then
    if #value > 0 or next(value) == nil then
      local parts = {}
      for i = 1, #value do parts[i] = M.json_encode(value[i]) end
      return "[" .. table.concat(parts, ",") .. "]"
    end
    local keys = {}
    for k in pairs(value) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    local parts = {}
    for _, k in ipairs(keys) do parts[#parts + 1] = encode_string(k) .. ":" .. M.json_encode(value[k]) end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  error("cannot encode " .. kind .. " as JSON")
end

function M.json_decode(text)
  local pos = 1
  local function skip() pos = text:find("[^ \t\r\n]", pos) or #text + 1 end
  local parse
  local function fail(what) error(string.format("bad JSON at %d: %s", pos, what), 0) end
  local function parse_string()
    local out, i = {}, pos + 1
    while true do
      local c = text:sub(i, i)
      if c == "" then fail("unterminated string") end
      if c == '"' then pos = i + 1; return table.concat(out) end
      if c == "\\" then
        local e = text:sub(i + 1, i + 1)
        local simple = { b = "\b", f = "\f", n = "\n", r = "\r", t = "\t", ['"'] = '"', ["\\"] = "\\", ["/"] = "/" }
        if simple[e] then out[#out + 1] = simple[e]; i = i + 2
        elseif e == "u" then
          local code = tonumber(text:sub(i + 2, i + 5), 16) or fail("bad \\u escape")
          out[#out + 1] = utf8.char(code); i = i + 6
        else fail("bad escape") end
      else out[#out + 1] = c; i = i + 1 end
    end
  end
  function parse()
    skip()
    local c = text:sub(pos, pos)
    if c == "{" then
      local obj = {}
      pos = pos + 1; skip()
      if text:sub(pos, pos) == "}" then pos = pos + 1; return obj end
      while true do
        skip()
        if text:sub(pos, pos) ~= '"' then fail("expected a key") end
        local key = parse_string()
        skip()
        if text:sub(pos, pos) ~= ":" then fail("expected ':'") end
        pos = pos + 1
        obj[key] = parse()
        skip()
        local d = text:sub(pos, pos); pos = pos + 1
        if d == "}" then return obj end
        if d ~= "," then fail("expected ',' or '}'") end
      end
    elseif c == "[" then
      local arr = {}
      pos = pos + 1; skip()
      if text:sub(pos, pos) == "]" then pos = pos + 1; return arr end
      while true do
        arr[#arr + 1] = parse()
        skip()
        local d = text:sub(pos, pos); pos = pos + 1
        if d == "]" then return arr end
        if d ~= "," then fail("expected ',' or ']'") end
      end
    elseif c == '"' then return parse_string()
    elseif text:sub(pos, pos + 3) == "true" then pos = pos + 4; return true
    elseif text:sub(pos, pos + 4) == "false" then pos = pos + 5; return false
    elseif text:sub(pos, pos + 3) == "null" then pos = pos + 4; return nil
    else
      local number = text:match("^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
      if not number or number == "" then fail("unexpected character") end
      pos = pos + #number
      return tonumber(number)
    end
  end
  return parse()
end

-- files ------------------------------------------------------------------------------------------------------
function M.join(...) return table.concat({ ... }, SEP) end

function M.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local data = f:read("a")
  f:close()
  return data
end

function M.read_json(path)
  local text = M.read_file(path)
  if not text then return nil end
  local ok, value = pcall(M.json_decode, text)
  if ok then return value end
  return nil -- a file being replaced right now: read it again next cycle
end

function M.write_file_atomic(hotfolder, final_path, data)
  local tmp = M.join(hotfolder, ".tmp", string.format("%d-%d.part", os.time(), math.random(1, 1e9)))
  local f = assert(io.open(tmp, "wb"))
  f:write(data)
  f:close()
  assert(os.rename(tmp, final_path))
end

function M.extension(path) return (path:match("%.([%w]+)$") or "wav"):lower() end

function M.basename(path) return path:match("([^/\\]+)$") or path end

-- settings (kept with SetExtState) ---------------------------------------------------------------------------
M.DEFAULTS = {
  hotfolder = M.join(os.getenv("HOME") or os.getenv("USERPROFILE") or ".", "stemquery"),
  engine = "",
  refine = "0",
  format = "wav",
}

function M.settings()
  local out = {}
  for key, default in pairs(M.DEFAULTS) do
    local value = reaper.GetExtState(M.SECTION, key)
    out[key] = (value ~= nil and value ~= "") and value or default
  end
  return out
end

function M.save_setting(key, value) reaper.SetExtState(M.SECTION, key, value, true) end

-- the server ---------------------------------------------------------------------------------------------------
function M.server_running(hotfolder)
  local status = M.read_json(M.join(hotfolder, "status.json"))
  if type(status) ~= "table" or type(status.updated) ~= "number" then return false, M.NOT_RUNNING end
  if status.state == "stopped" or os.time() - status.updated > M.STALE_SECONDS then return false, M.NOT_RUNNING end
  return true, status
end

-- items --------------------------------------------------------------------------------------------------------
--- The file and the window of it that REAPER plays for this item, or nil and why it is refused.
--- Supported: any take start offset, item length, sections of a source. Refused (with the fix): MIDI, take FX,
--- playrate ≠ 1, reversed sources, items that loop past the end of their source.
function M.item_audio(item)
  local take = reaper.GetActiveTake(item)
  if not take then return nil, "the item has no take" end
  local _, take_name = reaper.GetSetMediaItemTakeInfo_String(take, "P_NAME", "", false)
  local name = (take_name and take_name ~= "") and take_name or "item"
  if reaper.TakeIsMIDI(take) then
    return nil, string.format("'%s' is a MIDI item: render it to audio first (Item: Apply track/take FX to items)", name)
  end
  if reaper.TakeFX_GetCount(take) > 0 then
    return nil, string.format("'%s' has take FX: apply them first (Item: Apply track/take FX to items) or glue the item", name)
  end
  local playrate = reaper.GetMediaItemTakeInfo_Value(take, "D_PLAYRATE")
  if math.abs(playrate - 1.0) > 1e-9 then
    return nil, string.format("'%s' plays at rate %.3f: glue the item (Item: Glue items) so its audio is at rate 1", name, playrate)
  end
  local source = reaper.GetMediaItemTake_Source(take)
  -- The take plays [D_STARTOFFS, D_STARTOFFS + length) of its source; a section source is itself a window
  -- (offset, length) of its parent file.
  local take_start = reaper.GetMediaItemTakeInfo_Value(take, "D_STARTOFFS")
  local length = reaper.GetMediaItemInfo_Value(item, "D_LENGTH") * playrate
  if take_start < -1e-9 or take_start + length > reaper.GetMediaSourceLength(source) + 1e-6 then
    return nil, string.format("'%s' loops or extends past its source: glue the item first", name)
  end
  local offset = 0.0
  local is_section, section_offset, _, reversed = reaper.PCM_Source_GetSectionInfo(source)
  if is_section then
    if reversed then
      return nil, string.format("'%s' plays its source reversed: glue the item first", name)
    end
    offset = section_offset
    source = reaper.GetMediaSourceParent(source) or source
  end
  local path = reaper.GetMediaSourceFileName(source)
  if not path or path == "" then return nil, string.format("'%s' has no source file", name) end
  return { path = path, start = take_start + offset, length = length, name = name,
           position = reaper.GetMediaItemInfo_Value(item, "D_POSITION"),
           track = reaper.GetMediaItem_Track(item) }
end

function M.selected_items()
  local items = {}
  for i = 0, reaper.CountSelectedMediaItems(0) - 1 do items[#items + 1] = reaper.GetSelectedMediaItem(0, i) end
  return items
end

function M.message(text)
  reaper.ShowMessageBox(text, "stemquery", 0)
end

-- the selection ------------------------------------------------------------------------------------------------
--- The longest selected item is the mix (the first of equally long ones), the others are query items, in selection
--- order. Returns mix, queries (item_audio windows) or nil and what to tell the user.
function M.mix_and_queries(usage)
  local items = M.selected_items()
  if #items < 2 then return nil, usage end
  local longest = 1
  for i, item in ipairs(items) do
    if reaper.GetMediaItemInfo_Value(item, "D_LENGTH") > reaper.GetMediaItemInfo_Value(items[longest], "D_LENGTH") then
      longest = i
    end
  end
  table.insert(items, 1, table.remove(items, longest))
  local audio = {}
  for i, item in ipairs(items) do
    local window, why = M.item_audio(item)
    if not window then return nil, "stemquery cannot use this item: " .. why end
    audio[i] = window
  end
  local mix = table.remove(audio, 1)
  return mix, audio
end

--- Stem names typed by the user ("bass, drums, keys"): trimmed, empty ones dropped, repeats (any case) once.
function M.parse_names(text)
  local names, seen = {}, {}
  for field in (text .. ","):gmatch("([^,]*),") do
    local name = field:match("^%s*(.-)%s*$")
    if name ~= "" and not seen[name:lower()] then
      seen[name:lower()] = true
      names[#names + 1] = name
    end
  end
  return names
end

-- the job ------------------------------------------------------------------------------------------------------
--- Build the hot-folder job for a mix window and either query windows (and/or query ranges inside the mix window),
--- giving one stem, "target"; or `stems`, a list of { name = ..., queries = { windows } } (no queries: the server
--- uses its bundled examples of the instrument called `name`), giving one stem each (docs/hotfolder.md).
--- Returns the job: its id, the files to copy into inbox/, the spec, and the stems to import, in order.
function M.make_job(settings, mix, queries, query_ranges, stems)
  local id = string.format("reaper-%d-%06d", os.time(), math.random(0, 999999))
  local copies, names = {}, {}
  local function copy_name(path)
    if not names[path] then
      names[path] = string.format("%s_%d.%s", id, #copies + 1, M.extension(path))
      copies[#copies + 1] = { from = path, name = names[path] }
    end
    return names[path]
  end
  local function add_queries(target, windows)
    target.query, target.query_windows = {}, {}
    for _, q in ipairs(windows) do
      target.query[#target.query + 1] = copy_name(q.path)
      target.query_windows[#target.query_windows + 1] = { q.start, q.length }
    end
  end
  local spec = {
    mix = copy_name(mix.path),
    mix_window = { mix.start, mix.length },
    format = settings.format,
    refine = settings.refine == "1",
  }
  if settings.engine ~= "" then spec.engine = settings.engine end
  local order = { "target" }
  if stems then
    spec.stems, order = {}, {}
    for i, stem in ipairs(stems) do
      spec.stems[i] = { name = stem.name }
      if stem.queries and #stem.queries > 0 then add_queries(spec.stems[i], stem.queries) end
      order[i] = stem.name
    end
  else
    add_queries(spec, queries)
    spec.query_ranges = query_ranges or {}
  end
  order[#order + 1] = "residual"
  return { id = id, copies = copies, spec = spec, mix = mix, hotfolder = settings.hotfolder, order = order }
end

--- Check that the server runs, then send the job (make_job's arguments after the settings) and follow it.
function M.submit(mix, queries, query_ranges, stems)
  local settings = M.settings()
  local running, status = M.server_running(settings.hotfolder)
  if not running then M.message(status); return end
  M.start(M.make_job(settings, mix, queries, query_ranges, stems))
end

-- the defer loop -----------------------------------------------------------------------------------------------
local Job = {}
Job.__index = Job

function M.start(job)
  local self = setmetatable(job, Job)
  self.state, self.copy_index, self.fraction, self.stage = "copying", 1, 0.0, "sending audio"
  self.window_open = false
  reaper.defer(function() self:step() end)
  return self
end

function Job:folder(kind) return M.join(self.hotfolder, kind, self.id) end

function Job:copy_some()
  local copy = self.copies[self.copy_index]
  if not copy then return true end
  if not copy.input then
    copy.input = io.open(copy.from, "rb")
    if not copy.input then error(string.format("cannot read %s", copy.from), 0) end
    copy.tmp = M.join(self.hotfolder, ".tmp", copy.name .. ".part")
    copy.output = assert(io.open(copy.tmp, "wb"))
  end
  local block = copy.input:read(M.COPY_CHUNK)
  if block then copy.output:write(block); return false end
  copy.input:close(); copy.output:close()
  assert(os.rename(copy.tmp, M.join(self.hotfolder, "inbox", copy.name)))
  self.copy_index = self.copy_index + 1
  return self.copy_index > #self.copies
end

function Job:submit()
  local final = M.join(self.hotfolder, "inbox", self.id .. ".job.json")
  M.write_file_atomic(self.hotfolder, final, M.json_encode(self.spec))
  self.state, self.stage = "waiting", "queued"
end

function Job:cancel()
  local folder = self:folder("processing")
  local f = io.open(M.join(folder, "cancel"), "wb")
  if not f then f = io.open(M.join(self.hotfolder, "inbox", self.id .. ".cancel"), "wb") end
  if f then f:close() end
  self.state = "cancelling"
end

function Job:draw()
  if not self.window_open then
    gfx.init("stemquery", 380, 90)
    self.window_open = true
  end
  local key = gfx.getchar()
  if key == -1 or key == 27 then return false end -- window closed or Esc: cancel
  gfx.set(0.15, 0.15, 0.15); gfx.rect(0, 0, 380, 90, 1)
  gfx.set(0.3, 0.7, 0.4); gfx.rect(10, 40, math.floor(360 * self.fraction), 16, 1)
  gfx.set(1, 1, 1); gfx.x, gfx.y = 10, 12
  gfx.drawstr(string.format("%s: %d%%  (Esc cancels)", self.stage, math.floor(100 * self.fraction)))
  gfx.update()
  return true
end

function Job:close_window()
  if self.window_open then gfx.quit(); self.window_open = false end
end

function Job:step()
  local ok, err = pcall(function() self:advance() end)
  if not ok then
    self:close_window()
    M.message("stemquery: " .. tostring(err))
    return
  end
  if self.state == "finished" then self:close_window(); return end
  reaper.defer(function() self:step() end)
end

function Job:advance()
  if self.state ~= "cancelling" and self.state ~= "copying" and not self:draw() then
    self:cancel()
  end
  if self.state == "copying" then
    if self:copy_some() then self:submit() end
    return
  end
  local result = M.read_json(M.join(self:folder("done"), "result.json"))
  if result then
    self:import(result.stems)
    self.state = "finished"
    return
  end
  local failure = M.read_json(M.join(self:folder("failed"), "error.json"))
  if failure then
    self.state = "finished"
    if failure.code == "cancelled" then
      reaper.ShowConsoleMsg("stemquery: job " .. self.id .. " cancelled\n")
    else
      M.message(string.format("stemquery could not separate '%s':\n%s", self.mix.name, tostring(failure.message)))
    end
    return
  end
  local status = M.read_json(M.join(self:folder("processing"), "status.json"))
  if status then
    self.fraction = tonumber(status.progress) or self.fraction
    self.stage = status.stage ~= "" and status.stage or status.state
  end
end

function Job:import(stems)
  local mix = self.mix
  local track_number = math.floor(reaper.GetMediaTrackInfo_Value(mix.track, "IP_TRACKNUMBER"))
  local cursor = reaper.GetCursorPosition()
  reaper.PreventUIRefresh(1)
  reaper.Undo_BeginBlock()
  for offset, stem in ipairs(self.order) do
    local path = stems[stem]
    if path then
      local index = track_number + offset - 1 -- 0-based: right under the mix's track, in the order asked for
      reaper.InsertTrackAtIndex(index, true)
      local track = reaper.GetTrack(0, index)
      reaper.GetSetMediaTrackInfo_String(track, "P_NAME", string.format("%s – %s (stemquery)", mix.name, stem), true)
      reaper.SetOnlyTrackSelected(track)
      reaper.SetEditCurPos(mix.position, false, false)
      reaper.InsertMedia(path, 0)
    end
  end
  reaper.SetEditCurPos(cursor, false, false)
  reaper.Undo_EndBlock("stemquery: import separated stems", -1)
  reaper.PreventUIRefresh(-1)
  reaper.UpdateArrange()
end

return M
