-- @description stemquery: Separate selected item using time selection as query
-- @version 0.1.0
-- @author stemquery
-- @about
--   Select one item (the mix) and make a time selection inside it where the sound you want is exposed.
--   stemquery (`stemquery serve`, running on this computer) uses that part of the mix as the query and
--   separates the sound from the whole item; the target and the residual come back as new tracks under the
--   mix's track, at the item's position, sample-aligned. Progress shows in a small window; Esc cancels.
-- @provides
--   [main] .
--   [nomain] stemquery_common.lua
local folder = ({ reaper.get_action_context() })[2]:match("^(.*[/\\])")
local stemquery = dofile(folder .. "stemquery_common.lua")

local MIN_QUERY_SECONDS = 0.5

local function run()
  local items = stemquery.selected_items()
  if #items ~= 1 then
    stemquery.message("Select exactly one item (the mix), and make a time selection inside it where the wanted sound plays.")
    return
  end
  local mix, why = stemquery.item_audio(items[1])
  if not mix then stemquery.message("stemquery cannot use this item: " .. why); return end
  local selection_start, selection_end = reaper.GetSet_LoopTimeRange(false, false, 0, 0, false)
  local first = math.max(selection_start, mix.position) - mix.position
  local last = math.min(selection_end, mix.position + mix.length) - mix.position
  if selection_end <= selection_start or last - first < MIN_QUERY_SECONDS then
    stemquery.message(string.format("Make a time selection of at least %.1f s inside the item: it is the query.",
      MIN_QUERY_SECONDS))
    return
  end
  stemquery.submit(mix, {}, { { first, last } })
end

run()
