-- FakeReaper: a stand-in for REAPER's `reaper` and `gfx` tables, for running the stemquery ReaScripts in a real
-- Lua 5.4 interpreter. REAPER itself cannot run here; this fake is honest about it:
--   * every function REAPER v7.40 has exists (names and arities from reaper_api_facts.json); calling one with
--     more arguments than REAPER takes fails, and calling one the fake does not implement fails loudly;
--   * the implemented ones act on a small in-memory project (tracks, items, takes, sources) and record what the
--     scripts did (messages, new tracks, InsertMedia calls with the edit cursor and selected track, undo blocks).
local Fake = {}

local function encode(value)
  local kind = type(value)
  if kind == "nil" then return "null" end
  if kind == "boolean" or kind == "number" then return tostring(value) end
  if kind == "string" then
    return '"' .. value:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
  end
  if #value > 0 or next(value) == nil then
    local parts = {}
    for i = 1, #value do parts[i] = encode(value[i]) end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  local parts = {}
  for k, v in pairs(value) do parts[#parts + 1] = encode(tostring(k)) .. ":" .. encode(v) end
  return "{" .. table.concat(parts, ",") .. "}"
end
Fake.encode = encode

function Fake.install(arity, project, script_path)
  local record = { calls = {}, messages = {}, console = {}, inserted = {}, new_tracks = {}, undo = {},
                   extstate = {}, defer_calls = 0 }
  local state = {
    tracks = {}, items = {}, cursor = project.cursor or 0.0, selected_track = nil, undo_depth = 0,
    extstate = project.extstate or {}, gfx_keys = project.gfx_keys or {}, time_selection = project.time_selection,
    deferred = {}, user_inputs = project.user_inputs,
  }
  for i, t in ipairs(project.tracks) do state.tracks[i] = { kind = "track", name = t.name } end
  for _, spec in ipairs(project.items) do
    local item = { kind = "item", track = state.tracks[spec.track], position = spec.position, length = spec.length,
                   selected = spec.selected ~= false }
    local s = spec.source
    local source = { kind = "source", file = s.file, length = s.length }
    if s.section then
      source = { kind = "source", section = s.section, parent = source, length = s.section.length }
    end
    item.take = { kind = "take", name = spec.name, startoffs = spec.startoffs or 0.0, playrate = spec.playrate or 1.0,
                  midi = spec.midi or false, fx = spec.fx or 0, source = source }
    state.items[#state.items + 1] = item
  end

  local impl = {}
  function impl.get_action_context() return false, script_path, 0, 0, -1, -1, -1, "" end
  function impl.GetExtState(section, key) return state.extstate[section .. "/" .. key] or "" end
  function impl.SetExtState(section, key, value, persist)
    state.extstate[section .. "/" .. key] = value
    record.extstate[section .. "/" .. key] = value
  end
  local function selected()
    local out = {}
    for _, item in ipairs(state.items) do if item.selected then out[#out + 1] = item end end
    return out
  end
  function impl.CountSelectedMediaItems(proj) return #selected() end
  function impl.GetSelectedMediaItem(proj, index) return selected()[index + 1] end
  function impl.GetMediaItemInfo_Value(item, name)
    local values = { D_LENGTH = item.length, D_POSITION = item.position }
    return assert(values[name], "FakeReaper: item value " .. name .. " not faked")
  end
  function impl.GetActiveTake(item) return item.take end
  function impl.GetSetMediaItemTakeInfo_String(take, name, value, set)
    assert(name == "P_NAME" and not set, "FakeReaper: only reading P_NAME is faked")
    return true, take.name or ""
  end
  function impl.TakeIsMIDI(take) return take.midi end
  function impl.TakeFX_GetCount(take) return take.fx end
  function impl.GetMediaItemTakeInfo_Value(take, name)
    local values = { D_STARTOFFS = take.startoffs, D_PLAYRATE = take.playrate }
    return assert(values[name], "FakeReaper: take value " .. name .. " not faked")
  end
  function impl.GetMediaItemTake_Source(take) return take.source end
  function impl.PCM_Source_GetSectionInfo(src)
    if not src.section then return false, 0.0, 0.0, false end
    return true, src.section.offset, src.section.length, src.section.reversed or false
  end
  function impl.GetMediaSourceParent(src) return src.parent end
  function impl.GetMediaSourceFileName(src) return src.file or "" end
  function impl.GetMediaSourceLength(src) return src.length, false end
  function impl.GetMediaItem_Track(item) return item.track end
  function impl.ShowMessageBox(msg, title, kind) record.messages[#record.messages + 1] = msg; return 1 end
  function impl.ShowConsoleMsg(msg) record.console[#record.console + 1] = msg end
  function impl.defer(fn) assert(type(fn) == "function"); state.deferred[#state.deferred + 1] = fn end
  function impl.GetSet_LoopTimeRange(is_set, is_loop, start, stop, autoseek)
    assert(not is_set, "FakeReaper: setting the time selection is not faked")
    if not state.time_selection then return 0.0, 0.0 end
    return state.time_selection[1], state.time_selection[2]
  end
  function impl.GetUserInputs(title, count, captions, values)
    -- REAPER splits both the defaults and the answer into fields at the separator (`separator=X` among the
    -- captions, else a comma): a script that asks for one field of comma-separated names must change it.
    local separator = captions:match("separator=(.)") or ","
    local fields = select(2, (state.user_inputs or values):gsub(separator:gsub("%p", "%%%0"), "")) + 1
    assert(fields <= count, string.format("FakeReaper: GetUserInputs asks for %d field(s) but '%s' holds %d at "
      .. "separator %q", count, state.user_inputs or values, fields, separator))
    record.user_inputs_default = values
    if not state.user_inputs then return false, values end
    return true, state.user_inputs
  end
  function impl.GetMediaTrackInfo_Value(track, name)
    assert(name == "IP_TRACKNUMBER", "FakeReaper: track value " .. name .. " not faked")
    for i, t in ipairs(state.tracks) do if t == track then return i end end
    return 0
  end
  function impl.GetCursorPosition() return state.cursor end
  function impl.PreventUIRefresh(n) end
  function impl.Undo_BeginBlock() state.undo_depth = state.undo_depth + 1 end
  function impl.Undo_EndBlock(description, flags)
    state.undo_depth = state.undo_depth - 1
    record.undo[#record.undo + 1] = description
  end
  function impl.InsertTrackAtIndex(index, defaults)
    assert(state.undo_depth > 0, "FakeReaper: track created outside an undo block")
    local track = { kind = "track", name = "" }
    table.insert(state.tracks, index + 1, track)
  end
  function impl.GetTrack(proj, index) return state.tracks[index + 1] end
  function impl.GetSetMediaTrackInfo_String(track, name, value, set)
    assert(name == "P_NAME", "FakeReaper: only P_NAME is faked")
    if set then track.name = value end
    return true, track.name
  end
  function impl.SetOnlyTrackSelected(track) state.selected_track = track end
  function impl.SetEditCurPos(time, moveview, seekplay) state.cursor = time end
  function impl.InsertMedia(file, mode)
    assert(mode == 0, "FakeReaper: only mode 0 (add to the selected track at the edit cursor) is faked")
    local index = impl.GetMediaTrackInfo_Value(state.selected_track, "IP_TRACKNUMBER")
    record.inserted[#record.inserted + 1] = { file = file, track = state.selected_track.name, track_index = index,
                                              position = state.cursor, in_undo = state.undo_depth > 0 }
    return 1
  end
  function impl.UpdateArrange() end

  reaper = {}
  for name, count in pairs(arity) do
    reaper[name] = function(...)
      local given = select("#", ...)
      record.calls[#record.calls + 1] = name
      if given > count then
        error(string.format("FakeReaper: reaper.%s takes at most %d arguments, got %d", name, count, given), 2)
      end
      local fn = impl[name]
      if not fn then error("FakeReaper: reaper." .. name .. " is real but not implemented by the fake", 2) end
      return fn(...)
    end
  end
  setmetatable(reaper, { __index = function(_, name)
    error("FakeReaper: REAPER has no function reaper." .. tostring(name), 2)
  end })

  gfx = { x = 0, y = 0 }
  function gfx.init(...) record.gfx_opened = true end
  function gfx.getchar()
    if #state.gfx_keys > 0 then return table.remove(state.gfx_keys, 1) end
    return 0
  end
  function gfx.set(...) end
  function gfx.rect(...) end
  function gfx.drawstr(...) end
  function gfx.update() end
  function gfx.quit() record.gfx_closed = true end

  function Fake.run_deferred()
    local pending = state.deferred
    state.deferred = {}
    for _, fn in ipairs(pending) do
      record.defer_calls = record.defer_calls + 1
      fn()
    end
    return #state.deferred > 0
  end

  function Fake.finish()
    record.tracks = {}
    for i, t in ipairs(state.tracks) do record.tracks[i] = t.name end
    record.cursor = state.cursor
    record.pending_defer = #state.deferred
    return record
  end
end

return Fake
