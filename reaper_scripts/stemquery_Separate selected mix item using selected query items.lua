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
  local mix, queries = stemquery.mix_and_queries(
    "Select the mix item and at least one query item (the longest selected item is the mix).\n" ..
    "To use part of the mix itself as the query, use 'Separate selected item using time selection as query'.")
  if not mix then stemquery.message(queries); return end
  stemquery.submit(mix, queries, {})
end

run()
