-- @description stemquery: Separate selected mix item into one track per selected query item (longest item = mix)
-- @version 0.1.0
-- @author stemquery
-- @about
--   Select the mix item and one item per sound you want (a bass lick, a drum fill, a few seconds where the
--   piano plays alone, ...). The LONGEST selected item is the mix; every other item is the example of one stem,
--   named after its take (items with the same take name are several examples of one stem). stemquery
--   (`stemquery serve`, running on this computer) separates all of them in one pass; each stem comes back as a
--   new track under the mix's track, then the residual (everything else), at the mix item's position,
--   sample-aligned; the stems and the residual add up to the mix. Progress shows in a small window; Esc cancels.
-- @provides
--   [main] .
--   [nomain] stemquery_common.lua
local folder = ({ reaper.get_action_context() })[2]:match("^(.*[/\\])")
local stemquery = dofile(folder .. "stemquery_common.lua")

--- One stem per distinct take name, in the order the items were selected, each with its query windows.
local function stems_of(queries)
  local stems, by_name = {}, {}
  for _, query in ipairs(queries) do
    local key = query.name:lower()
    if not by_name[key] then
      by_name[key] = { name = query.name, queries = {} }
      stems[#stems + 1] = by_name[key]
    end
    table.insert(by_name[key].queries, query)
  end
  return stems
end

local function run()
  local mix, queries = stemquery.mix_and_queries(
    "Select the mix item and one query item per stem you want (the longest selected item is the mix; each " ..
    "stem is named after its query item's take).")
  if not mix then stemquery.message(queries); return end
  local stems = stems_of(queries)
  for _, stem in ipairs(stems) do
    if stem.name:lower() == "residual" then
      stemquery.message("A query item's take is called 'residual': that name is everything else; rename the take.")
      return
    end
  end
  stemquery.submit(mix, nil, nil, stems)
end

run()
