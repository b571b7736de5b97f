-- pandoc filter for hubagent.toml(5) (packaging/man/manuals.sh): the tables of
-- docs/configuration.md become tagged paragraphs, as man pages list keys. A table's first column
-- is the tag; the middle columns become one line "default: 15s", named by their headers; the
-- last column is the text. (tbl tables with long cells do not fit a terminal: groff warns, and
-- lintian fails on its warnings.)

local function cell_inlines(cell)
  return pandoc.utils.blocks_to_inlines(cell.contents)
end

function Table(tbl)
  local headers = {}
  for _, cell in ipairs(tbl.head.rows[1].cells) do
    table.insert(headers, pandoc.utils.stringify(cell.contents))
  end
  local items = {}
  for _, body in ipairs(tbl.bodies) do
    for _, row in ipairs(body.body) do
      local cells = row.cells
      local definition = {}
      if #cells > 2 then
        local middle = {}
        for i = 2, #cells - 1 do
          if #middle > 0 then table.insert(middle, pandoc.Str(";")); table.insert(middle, pandoc.Space()) end
          table.insert(middle, pandoc.Str(headers[i] .. ":"))
          table.insert(middle, pandoc.Space())
          for _, inline in ipairs(cell_inlines(cells[i])) do table.insert(middle, inline) end
        end
        table.insert(definition, pandoc.Para(middle))
      end
      table.insert(definition, pandoc.Para(cell_inlines(cells[#cells])))
      table.insert(items, { cell_inlines(cells[1]), { definition } })
    end
  end
  return pandoc.DefinitionList(items)
end

-- Links to the other documents become their names (installed beside README.md in
-- /usr/share/doc/hubagent, which SEE ALSO names); links within the page become their text.
function Link(link)
  if link.target:match("^%a+://") then
    return nil
  end
  local file = link.target:match("^([^#]+)")
  local text = link.content
  if file and not pandoc.utils.stringify(text):find(file, 1, true) then
    table.insert(text, pandoc.Space())
    table.insert(text, pandoc.Str("(" .. file .. ")"))
  end
  return text
end
