-- @description stemquery: Separate selected mix item using selected query item(s) (longest item = mix)
-- @version 0.1.0
-- @author stemquery
-- @about
--   Select the mix item and one or more items holding examples of the sound you want (a few seconds where
--   it plays alone, a sample from your library, ...). The LONGEST selected item is the mix; the others are
--   the queries. stemquery (`stemquery serve`, running on this computer) separates that sound from the mix;
--   the target and the residual (everything else) come back as new tracks under the mix's track, at the mix
--   item's position, sample-aligned. Progress shows in a small window; Esc cancels.
-- @provides
--   [main] .
--   [nomain] stemquery_common.lua
local folder = ({ reaper.get_action_context() })[2]:match("^(.*[/\\])")
local stemquery = dofile(folder .. "stemquery_common.lua")

local function run()
  local items = stemquery.selected_items()
  if #items < 2 then
    stemquery.message("Select the mix item and at least one query item (the longest selected item is the mix).\n" ..
      "To use part of the mix itself as the query, use 'Separate selected item using time selection as query'.")
    return
  end
  table.sort(items, function(a, b)
    return reaper.GetMediaItemInfo_Value(a, "D_LENGTH") > reaper.GetMediaItemInfo_Value(b, "D_LENGTH")
  end)
  local audio = {}
  for i, item in ipairs(items) do
    local window, why = stemquery.item_audio(item)
    if not window then stemquery.message("stemquery cannot use this item: " .. why); return end
    audio[i] = window
  end
  local settings = stemquery.settings()
  local running, status = stemquery.server_running(settings.hotfolder)
  if not running then stemquery.message(status); return end
  local mix = table.remove(audio, 1)
  stemquery.start(stemquery.make_job(settings, mix, audio, {}))
end

run()
