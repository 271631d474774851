/* keyjobs timeline: one SVG bar per run, in lanes per runner thread or per key.
 *
 * The data comes from the page (json_script) and then from the timeline's
 * data endpoint while work waits or runs. Every text from the data is set
 * with textContent or as an attribute value, never through innerHTML.
 * No libraries: this file is the whole of it.
 */
(function () {
  "use strict";

  var SVG = "http://www.w3.org/2000/svg";
  var LABEL_WIDTH = 250;
  var AXIS_HEIGHT = 26;
  var ROW_HEIGHT = 14;
  var ROW_GAP = 3;
  var LANE_PADDING = 5;
  var MIN_SPAN = 200; // ms: the deepest zoom
  var IDLE_REFRESH = 15000; // ms between looks when nothing waits or runs
  var TICK_STEPS = [
    1e3, 2e3, 5e3, 10e3, 15e3, 30e3, 60e3, 120e3, 300e3, 600e3, 900e3, 1800e3,
    3600e3, 7200e3, 10800e3, 21600e3, 43200e3, 86400e3
  ];
  var MARKER_ROWS = { rerouted: 0, dropped: 1, reused: 2, debounced: 3, cancelled: 4, tick: 5 };
  var MARKER_TITLES = {
    rerouted: "parked (rerouted): its key was busy",
    dropped: "dropped by concurrency control",
    reused: "deduplicated: a duplicate delay() was merged into it",
    debounced: "debounced: a later delay() merged into it (its arguments, a later start)",
    cancelled: "cancelled before it ran",
    tick: "a schedule's tick: the invocation it created was due"
  };

  var config, data, root, tooltip, refreshStatus, truncatedNote, rangeNote;
  var pageWindow; // [start, end] of the window the page was asked for
  var lanesMode = "thread";
  var view = null; // [start, end] once the user zooms or pans; null follows the data's window
  var items = []; // what the current drawing shows, by index, for the tooltip
  var refreshTimer = null;
  var drag = null; // {x, range, width, moved} while the chart is dragged
  var lastDragMoved = false;
  var query = null; // what the data endpoint is asked for: the page's window, or a zoomed part of it
  var refreshes = 0; // incremental refreshes since the last whole one
  var zoomTimer = null;
  var details = {}; // the tooltip's details of an invocation, by id, once fetched
  var FULL_EVERY = 15; // every so many refreshes, the whole window again (lanes re-sorted, old ones gone)

  function el(name, attributes, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attributes || {}).forEach(function (attribute) {
      node.setAttribute(attribute, attributes[attribute]);
    });
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  function pad(number) {
    return (number < 10 ? "0" : "") + number;
  }

  function clock(ms, withSeconds) {
    var date = new Date(ms);
    var text = pad(date.getHours()) + ":" + pad(date.getMinutes());
    return withSeconds === false ? text : text + ":" + pad(date.getSeconds());
  }

  function clockMs(ms) {
    var text = String(Math.round(ms) % 1000);
    return clock(ms) + "." + "000".slice(text.length) + text;
  }

  function day(ms) {
    var date = new Date(ms);
    return date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate());
  }

  /* What the chart shows, as a person reads it: to the millisecond when it spans less than a minute. */
  function rangeLabel(start, end) {
    var show = end - start < 60000 ? clockMs : clock;
    var text = show(start) + " → " + (day(start) === day(end) ? "" : day(end) + " ") + show(end);
    return day(start) + " " + text + " (" + duration(Math.round(end - start)) + ")";
  }

  function duration(ms) {
    if (ms < 1000) {
      return Math.round(ms) + " ms";
    }
    if (ms < 60000) {
      return (ms / 1000).toFixed(2) + " s";
    }
    return Math.floor(ms / 60000) + " min " + Math.round((ms % 60000) / 1000) + " s";
  }

  function shortTask(name) {
    return name.slice(name.lastIndexOf(".") + 1);
  }

  function domain() {
    return view || fitted();
  }

  /* The part of the window that holds something, padded: a burst of a few seconds fills the chart. */
  function fitted() {
    var low = Infinity;
    var high = -Infinity;
    data.runs.forEach(function (run) {
      low = Math.min(low, runStart(run));
      high = Math.max(high, runEnd(run));
    });
    data.markers.forEach(function (marker) {
      low = Math.min(low, marker.at);
      high = Math.max(high, marker.at);
    });
    if (data.aggregated) {
      ["thread"].forEach(function (mode) {
        (data.bands[mode] || []).forEach(function (band) {
          low = Math.min(low, data.start + band[1] * data.step_ms);
          high = Math.max(high, data.start + (band[1] + 1) * data.step_ms);
        });
      });
      data.marker_bands.forEach(function (band) {
        low = Math.min(low, data.start + band[1] * data.step_ms);
        high = Math.max(high, data.start + (band[1] + 1) * data.step_ms);
      });
    }
    if (low === Infinity) {
      return [data.start, data.end];
    }
    if (data.active && data.follows_now) {
      high = data.now;
    }
    var padding = Math.max((high - low) * 0.04, 250);
    low = Math.max(data.start, low - padding);
    high = Math.min(data.end, high + padding);
    if (high - low < 2000) {
      high = Math.min(data.end, low + 2000);
      low = Math.max(data.start, high - 2000);
    }
    return [low, high];
  }

  function runStart(run) {
    return run.start === null ? data.start : run.start;
  }

  function runEnd(run) {
    return run.end === null ? data.now : run.end;
  }

  /* Lanes with their runs and markers; overlapping runs of one lane go to rows of their own. */
  function layout() {
    var lanes = [];
    var markerLane = null;
    if (lanesMode === "thread" && (data.markers.length || data.marker_bands.length)) {
      markerLane = { id: "markers", label: "concurrency control", runs: [], markers: [], rows: 0, raw_key: "" };
      lanes.push(markerLane);
    }
    var entries = data.lanes[lanesMode].map(function (lane) {
      var entry = {
        id: lane.id, label: lane.label, task: lane.task || "", raw_key: lane.raw_key || "", runs: [], markers: [],
        rows: 0
      };
      lanes.push(entry);
      return entry;
    });
    data.runs.forEach(function (run) {
      var lane = entries[lanesMode === "thread" ? run.thread_lane : run.key_lane];
      if (lane) {
        lane.runs.push(run);
      }
    });
    data.markers.forEach(function (marker) {
      var lane = markerLane || entries[marker.key_lane];
      if (lane) {
        lane.markers.push(marker);
      }
    });
    // Counted, not one by one: a band per lane, and markers per kind and step.
    lanes.forEach(function (lane) { lane.bands = []; lane.markerBands = []; });
    if (data.aggregated) {
      (data.bands[lanesMode] || []).forEach(function (band) {
        var lane = entries[band[0]];
        if (lane) {
          lane.bands.push(band);
        }
      });
      data.marker_bands.forEach(function (band) {
        var lane = markerLane || entries[band[0]];
        if (lane) {
          lane.markerBands.push(band);
        }
      });
    }
    lanes.forEach(function (lane) {
      var ends = [];
      var markerRows = 0;
      if (lane === markerLane) {
        var kinds = {};
        lane.markers.forEach(function (marker) { kinds[marker.kind] = true; });
        lane.markerBands.forEach(function (band) { kinds[data.band_kinds[band[2]]] = true; });
        var used = Object.keys(MARKER_ROWS).filter(function (kind) { return kinds[kind]; });
        lane.markerRow = {};
        used.forEach(function (kind, index) { lane.markerRow[kind] = index; });
        markerRows = used.length;
      } else if (lane.markers.length || lane.markerBands.length) {
        markerRows = 1;
      }
      lane.runs.sort(function (a, b) { return runStart(a) - runStart(b) || a.id - b.id; });
      lane.runs.forEach(function (run) {
        var row = 0;
        while (row < ends.length && ends[row] > runStart(run)) {
          row += 1;
        }
        ends[row] = runEnd(run);
        run.row = markerRows + row;
      });
      lane.markerRows = markerRows;
      lane.rows = Math.max(1, markerRows + ends.length + (lane.bands.length ? 1 : 0));
    });
    return lanes;
  }

  function ticks(start, end, width) {
    var wanted = Math.max(2, Math.floor(width / 110));
    var span = end - start;
    var step = TICK_STEPS[TICK_STEPS.length - 1];
    for (var i = 0; i < TICK_STEPS.length; i += 1) {
      if (span / TICK_STEPS[i] <= wanted) {
        step = TICK_STEPS[i];
        break;
      }
    }
    // Align ticks to the local clock (the offset matters for steps of an hour and more).
    var offset = new Date(start).getTimezoneOffset() * 60000;
    var first = Math.ceil((start - offset) / step) * step + offset;
    var result = [];
    for (var t = first; t <= end; t += step) {
      result.push(t);
    }
    return { values: result, step: step };
  }

  function render() {
    var width = Math.max(root.clientWidth, 640);
    var chartWidth = width - LABEL_WIDTH - 12;
    var range = domain();
    var start = range[0];
    var end = range[1];
    var scale = chartWidth / (end - start);
    var x = function (t) { return LABEL_WIDTH + (t - start) * scale; };
    var lanes = layout();
    var y = AXIS_HEIGHT;
    lanes.forEach(function (lane) {
      lane.y = y;
      lane.height = lane.rows * (ROW_HEIGHT + ROW_GAP) - ROW_GAP + 2 * LANE_PADDING;
      y += lane.height + 1;
    });
    var height = Math.max(y + 4, AXIS_HEIGHT + 50);
    items = [];

    var svg = el("svg", {
      width: width, height: height, "class": "kj-svg", "data-lanes": lanesMode,
      "data-start": Math.round(start), "data-end": Math.round(end)
    });
    var clipId = "kj-clip";
    var defs = el("defs");
    var clip = el("clipPath", { id: clipId });
    clip.appendChild(el("rect", { x: LABEL_WIDTH, y: 0, width: chartWidth, height: height }));
    defs.appendChild(clip);
    svg.appendChild(defs);

    // Lanes: a band and a label each.
    var laneGroup = el("g", { "class": "kj-lanes" });
    lanes.forEach(function (lane, index) {
      var group = el("g", { "class": "kj-lane", "data-lane": lane.id, "data-rows": lane.rows });
      if (index % 2 === 0) {
        group.appendChild(el("rect", { "class": "kj-lane-bg", x: 0, y: lane.y, width: width, height: lane.height }));
      }
      var text = lane.label.length > 38 ? lane.label.slice(0, 37) + "…" : lane.label;
      var label = el("g", { "class": "kj-lane-name" });
      label.appendChild(el("title", {}, lane.label));
      label.appendChild(el("text", { x: 6, y: lane.y + LANE_PADDING + ROW_HEIGHT - 3, "class": "kj-lane-label" }, text));
      if (lanesMode === "key" && lane.raw_key) {
        var link = el("a", {
          href: config.keyUrl + "?" + new URLSearchParams({ task: lane.task, key: lane.raw_key }).toString()
        });
        link.appendChild(label);
        group.appendChild(link);
      } else {
        group.appendChild(label);
      }
      laneGroup.appendChild(group);
    });
    svg.appendChild(laneGroup);

    // The time axis, with a grid line per tick.
    var axis = el("g", { "class": "kj-axis" });
    var tickInfo = ticks(start, end, chartWidth);
    tickInfo.values.forEach(function (t) {
      axis.appendChild(el("line", { "class": "kj-grid", x1: x(t), x2: x(t), y1: AXIS_HEIGHT - 6, y2: height }));
      axis.appendChild(el("text", { x: x(t), y: 14, "text-anchor": "middle" }, clock(t, tickInfo.step < 60000)));
    });
    svg.appendChild(axis);

    // Bars.
    var bars = el("g", { "class": "kj-bars", "clip-path": "url(#" + clipId + ")" });
    lanes.forEach(function (lane) {
      lane.runs.forEach(function (run) {
        var began = runStart(run);
        var stop = runEnd(run);
        if (stop < start || began > end) {
          return;
        }
        var x0 = Math.max(x(began), LABEL_WIDTH - 2);
        var x1 = Math.min(x(stop), width);
        var link = el("a", { href: config.changeUrl.replace("__id__", String(run.id)) });
        var bar = el("rect", {
          "class": "kj-bar" + (run.end === null ? " kj-running" : ""),
          x: x0.toFixed(1), y: lane.y + LANE_PADDING + run.row * (ROW_HEIGHT + ROW_GAP),
          width: Math.max(2, x1 - x0).toFixed(1), height: ROW_HEIGHT, rx: 2,
          fill: config.statusColours[run.status] || "#444",
          "data-id": run.id, "data-lane": lane.id, "data-status": run.status, "data-row": run.row,
          "data-start": began, "data-end": run.end === null ? "" : run.end, "data-item": items.length
        });
        items.push({ type: "run", value: run });
        link.appendChild(bar);
        // Its paused stretches, on the bar itself: the run waited there on another invocation.
        (run.pauses || []).forEach(function (pause) {
          var p0 = Math.max(x(pause[0] === null ? began : pause[0]), x0);
          var p1 = Math.min(x(pause[1] === null ? stop : pause[1]), x1);
          if (p1 <= p0) {
            return;
          }
          link.appendChild(el("rect", {
            "class": "kj-paused", x: p0.toFixed(1), y: bar.getAttribute("y"), width: (p1 - p0).toFixed(1),
            height: ROW_HEIGHT, fill: config.statusColours.PAUSED || "#ccc", "data-id": run.id
          }));
        });
        bars.appendChild(link);
      });
    });
    svg.appendChild(bars);

    // Bands: how many runs each step of a lane holds, by status; the darker, the more.
    if (data.aggregated) {
      var bandGroup = el("g", { "class": "kj-bands", "clip-path": "url(#" + clipId + ")" });
      var peak = 1;
      lanes.forEach(function (lane) {
        lane.bands.forEach(function (band) { peak = Math.max(peak, band[3]); });
      });
      lanes.forEach(function (lane) {
        lane.bands.forEach(function (band) {
          var from = data.start + band[1] * data.step_ms;
          var to = from + data.step_ms;
          if (to < start || from > end) {
            return;
          }
          var status = data.band_statuses[band[2]];
          var x0 = Math.max(x(from), LABEL_WIDTH);
          bandGroup.appendChild(el("rect", {
            "class": "kj-band", x: x0.toFixed(1), y: lane.y + LANE_PADDING + lane.markerRows * (ROW_HEIGHT + ROW_GAP),
            width: Math.max(1, x(to) - x0).toFixed(1), height: ROW_HEIGHT,
            fill: config.statusColours[status] || "#444", "fill-opacity": (0.25 + 0.75 * band[3] / peak).toFixed(2),
            "data-lane": lane.id, "data-status": status, "data-count": band[3], "data-item": items.length
          }));
          items.push({ type: "band", value: { from: from, to: to, status: status, count: band[3], lane: lane } });
        });
        lane.markerBands.forEach(function (band) {
          var at = data.start + (band[1] + 0.5) * data.step_ms;
          if (at < start || at > end) {
            return;
          }
          var kind = data.band_kinds[band[2]];
          var row = lane.markerRow ? lane.markerRow[kind] : 0;
          var width = Math.max(3, data.step_ms * scale);
          bandGroup.appendChild(el("rect", {
            "class": "kj-marker-band kj-marker", x: (x(at) - width / 2).toFixed(1),
            y: lane.y + LANE_PADDING + row * (ROW_HEIGHT + ROW_GAP) + 2, width: width.toFixed(1),
            height: ROW_HEIGHT - 4, fill: config.markerColours[kind], "data-kind": kind, "data-lane": lane.id,
            "data-count": band[3], "data-item": items.length
          }));
          items.push({ type: "markers", value: { at: at, kind: kind, count: band[3], lane: lane } });
        });
      });
      svg.appendChild(bandGroup);
    }

    // Markers: a symbol each, in the lane's marker row.
    var markers = el("g", { "class": "kj-markers", "clip-path": "url(#" + clipId + ")" });
    lanes.forEach(function (lane) {
      lane.markers.forEach(function (marker) {
        if (marker.at < start || marker.at > end) {
          return;
        }
        var row = lane.markerRow ? lane.markerRow[marker.kind] : 0;
        var cx = x(marker.at);
        var cy = lane.y + LANE_PADDING + row * (ROW_HEIGHT + ROW_GAP) + ROW_HEIGHT / 2;
        var r = 5;
        var shape;
        if (marker.kind === "rerouted") {
          shape = "M" + (cx - r) + "," + (cy - r) + "L" + (cx + r) + "," + (cy - r) + "L" + cx + "," + (cy + r) + "Z";
        } else if (marker.kind === "cancelled") {
          shape = "M" + (cx - r) + "," + (cy - r) + "H" + (cx + r) + "V" + (cy + r) + "H" + (cx - r) + "Z";
        } else if (marker.kind === "dropped") {
          shape = "M" + (cx - r) + "," + (cy - r) + "L" + (cx + r) + "," + (cy + r) +
            "M" + (cx + r) + "," + (cy - r) + "L" + (cx - r) + "," + (cy + r);
        } else if (marker.kind === "tick") {
          shape = "M" + (cx - r) + "," + (cy + r) + "L" + (cx + r) + "," + (cy + r) + "L" + cx + "," + (cy - r) + "Z";
        } else {
          shape = "M" + cx + "," + (cy - r) + "L" + (cx + r) + "," + cy + "L" + cx + "," + (cy + r) + "L" + (cx - r) + "," + cy + "Z";
        }
        var colour = config.markerColours[marker.kind];
        var link = el("a", { href: config.changeUrl.replace("__id__", String(marker.id)) });
        link.appendChild(el("path", {
          d: shape, "class": "kj-marker kj-marker-" + marker.kind,
          fill: marker.kind === "dropped" ? "none" : colour, stroke: colour,
          "stroke-width": marker.kind === "dropped" ? 2.5 : 1,
          "data-id": marker.id, "data-kind": marker.kind, "data-lane": lane.id, "data-at": marker.at,
          "data-item": items.length
        }));
        items.push({ type: "marker", value: marker });
        markers.appendChild(link);
      });
    });
    svg.appendChild(markers);

    if (data.now >= start && data.now <= end) {
      svg.appendChild(el("line", { "class": "kj-now", x1: x(data.now), x2: x(data.now), y1: AXIS_HEIGHT - 6, y2: height }));
    }
    if (!data.runs.length && !data.markers.length && !data.aggregated) {
      svg.appendChild(el("text", { "class": "kj-empty", x: LABEL_WIDTH + 10, y: AXIS_HEIGHT + 24 },
        "Nothing ran in this window."));
    }
    root.replaceChildren(svg);
    rangeNote.textContent = rangeLabel(start, end);
    root.dataset.runs = String(data.runs.length);
    root.dataset.markers = String(data.markers.length);
    root.dataset.lanes = lanesMode;
    attachPointer(svg, chartWidth);
  }

  /* Hover details, zoom with the wheel, pan by dragging (see startDragging), fit by double-click. */
  function attachPointer(svg, chartWidth) {
    svg.addEventListener("mousemove", function (event) {
      if (drag) {
        return;
      }
      var target = event.target.closest ? event.target.closest("[data-item]") : null;
      if (target) {
        showTooltip(items[Number(target.getAttribute("data-item"))], event);
      } else {
        tooltip.hidden = true;
      }
    });
    svg.addEventListener("mouseleave", function () {
      tooltip.hidden = true;
    });
    svg.addEventListener("mousedown", function (event) {
      if (event.button === 0 && event.clientX - svg.getBoundingClientRect().left > LABEL_WIDTH) {
        event.preventDefault();
        drag = { x: event.clientX, range: domain(), width: chartWidth, moved: false };
      }
    });
    svg.addEventListener("wheel", function (event) {
      var offset = event.clientX - svg.getBoundingClientRect().left - LABEL_WIDTH;
      if (offset < 0) {
        return;
      }
      event.preventDefault();
      zoom(event.deltaY < 0 ? 0.8 : 1.25, offset / chartWidth);
    }, { passive: false });
    svg.addEventListener("dblclick", function () {
      view = null;
      render();
    });
  }

  /* Dragging re-renders, which replaces the svg: the drag is followed on the window. */
  function startDragging() {
    window.addEventListener("mousemove", function (event) {
      if (!drag) {
        return;
      }
      var moved = event.clientX - drag.x;
      if (drag.moved || Math.abs(moved) > 3) {
        drag.moved = true;
        tooltip.hidden = true;
        var shift = moved / drag.width * (drag.range[1] - drag.range[0]);
        view = [drag.range[0] - shift, drag.range[1] - shift];
        render();
        root.firstChild.classList.add("kj-dragging");
      }
    });
    window.addEventListener("mouseup", function () {
      if (drag && drag.moved) {
        detailLater();
      }
      drag = null;
      if (root.firstChild) {
        root.firstChild.classList.remove("kj-dragging");
      }
    });
    // The click that ends a drag over a bar must not open the bar.
    window.addEventListener("click", function (event) {
      if (lastDragMoved) {
        event.preventDefault();
        event.stopPropagation();
      }
      lastDragMoved = false;
    }, true);
    window.addEventListener("mousedown", function () {
      lastDragMoved = false;
    }, true);
    window.addEventListener("mouseup", function () {
      lastDragMoved = Boolean(drag && drag.moved);
    }, true);
  }

  /* Where "+" zooms: at the moment of data nearest the centre of the view, so that it never zooms on nothing. */
  function dataAnchor() {
    var range = domain();
    var centre = (range[0] + range[1]) / 2;
    var best = null;
    function consider(t) {
      t = Math.min(Math.max(t, range[0]), range[1]);
      if (best === null || Math.abs(t - centre) < Math.abs(best - centre)) {
        best = t;
      }
    }
    data.runs.forEach(function (run) {
      if (runEnd(run) >= range[0] && runStart(run) <= range[1]) {
        consider(centre < runStart(run) ? runStart(run) : centre > runEnd(run) ? runEnd(run) : centre);
      }
    });
    data.markers.forEach(function (marker) {
      if (marker.at >= range[0] && marker.at <= range[1]) {
        consider(marker.at);
      }
    });
    return best === null ? 0.5 : (best - range[0]) / (range[1] - range[0]);
  }

  /* Counted data asks for the part in view once the zooming stops: a short enough part comes run by run. */
  function detailLater() {
    window.clearTimeout(zoomTimer);
    if (!data.aggregated && query === config.query) {
      return;
    }
    zoomTimer = window.setTimeout(function () {
      var range = domain();
      var whole = range[0] <= pageWindow[0] && range[1] >= pageWindow[1];
      query = whole ? config.query : Object.assign({}, config.query, {
        from: new Date(range[0]).toISOString(), to: new Date(range[1]).toISOString()
      });
      if (!whole) {
        delete query.minutes;
      }
      load(query).then(function (fresh) {
        data = fresh;
        describe();
        render();
        scheduleRefresh();
      });
    }, 300);
  }

  function zoom(factor, at) {
    var range = domain();
    var span = range[1] - range[0];
    var newSpan = Math.max(MIN_SPAN, span * factor);
    var anchor = range[0] + span * (at === undefined ? 0.5 : at);
    var start = anchor - (anchor - range[0]) * (newSpan / span);
    if (newSpan >= data.end - data.start) {
      view = [data.start, data.end];
    } else {
      view = [start, start + newSpan];
    }
    render();
    detailLater();
  }

  function showTooltip(item, event) {
    if (!item) {
      tooltip.hidden = true;
      return;
    }
    var lines = [];
    var title;
    if (item.type === "band" || item.type === "markers") {
      var counted = item.value;
      title = counted.count + (item.type === "band" ? " run(s), " + (config.statusLabels[counted.status] || counted.status)
        : " × " + MARKER_TITLES[counted.kind]);
      lines.push(item.type === "band" ? clock(counted.from) + " → " + clock(counted.to) : "around " + clock(counted.at));
      lines.push(counted.lane.label);
      lines.push("Too many to draw one by one: zoom in to see each.");
      fill(title, lines, event);
      return;
    }
    if (item.type === "run") {
      var run = item.value;
      var keyLane = data.lanes.key[run.key_lane];
      title = "#" + run.id + " " + shortTask(keyLane.task) + (keyLane.key ? " (" + keyLane.key + ")" : "");
      lines.push(config.statusLabels[run.status] || run.status);
      lines.push((run.start === null ? "started before the window" : "started " + clock(run.start)) +
        (run.end === null ? ", still running" : ", ended " + clock(run.end)));
      if (run.start !== null) {
        lines.push((run.end === null ? "running for " : "took ") + duration(runEnd(run) - run.start));
      }
      if (run.pauses && run.pauses.length) {
        var pausedFor = run.pauses.reduce(function (sum, pause) {
          return sum + ((pause[1] === null ? runEnd(run) : pause[1]) - (pause[0] === null ? runStart(run) : pause[0]));
        }, 0);
        lines.push("paused " + run.pauses.length + " time(s), " + duration(pausedFor) + " in all, waiting on other work");
      }
      if (run.parent !== null && run.parent !== undefined) {
        lines.push("delayed by #" + run.parent);
      }
      lines.push(data.lanes.thread[run.thread_lane].label);
      lines.push(keyLane.task);
      more(run.id, lines);
    } else {
      var marker = item.value;
      var markerLane = data.lanes.key[marker.key_lane];
      title = "#" + marker.id + " " + shortTask(markerLane.task) + (markerLane.key ? " (" + markerLane.key + ")" : "");
      lines.push(MARKER_TITLES[marker.kind]);
      lines.push("at " + clockMs(marker.at));
      more(marker.id, lines);
    }
    fill(title, lines, event);
    var id = item.value.id;
    if (!details[id]) {
      details[id] = "…";
      fetch(config.detailUrl + "?" + new URLSearchParams({ id: id }).toString(), { credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (found) {
          details[id] = found;
          if (!tooltip.hidden && tooltip.dataset.id === String(id)) {
            showTooltip(item, event);
          }
        })
        .catch(function () { details[id] = null; });
    }
    tooltip.dataset.id = String(id);
  }

  /* What the tooltip adds once the invocation's details are fetched: its call and how long it waited. */
  function more(id, lines) {
    var found = details[id];
    if (found && typeof found === "object") {
      lines.unshift(found.call);
      lines.push("waited " + found.queued + " before it started (created " + found.created + ")");
    } else if (found === "…") {
      lines.push("…");
    }
  }

  function fill(title, lines, event) {
    tooltip.replaceChildren();
    var strong = document.createElement("strong");
    strong.textContent = title;
    tooltip.appendChild(strong);
    tooltip.appendChild(document.createTextNode(lines.join("\n")));
    tooltip.hidden = false;
    var left = Math.min(event.clientX + 14, window.innerWidth - tooltip.offsetWidth - 8);
    var top = event.clientY + 14;
    if (top + tooltip.offsetHeight > window.innerHeight) {
      top = event.clientY - tooltip.offsetHeight - 10;
    }
    tooltip.style.left = left + "px";
    tooltip.style.top = top + "px";
  }

  function setLanes(mode) {
    lanesMode = mode === "key" ? "key" : "thread";
    ["thread", "key"].forEach(function (name) {
      document.getElementById("kj-lanes-" + name).setAttribute("aria-pressed", String(name === lanesMode));
    });
    var input = document.getElementById("kj-lanes-input");
    if (input) {
      input.value = lanesMode;
    }
    var url = new URL(window.location.href);
    url.searchParams.set("lanes", lanesMode);
    window.history.replaceState(null, "", url.toString());
    describe();
    render();
  }

  function describe() {
    var text = data.aggregated
      ? "too busy to draw run by run: counts per " + duration(data.step_ms) + " (zoom in for each run), "
      : data.runs.length + " run(s), " + data.markers.length + " marker(s), ";
    text += data.lanes[lanesMode].length + " lane(s)" +
      (data.folded_keys ? " (" + data.folded_keys + " quieter keys share a lane per task)" : "") +
      " · updated " + clock(data.now);
    if (data.active) {
      text += " · work is waiting or running: refreshing every " + config.refreshMs / 1000 + " s";
    } else if (data.follows_now) {
      text += " · idle";
    }
    refreshStatus.textContent = text;
    truncatedNote.hidden = !data.truncated;
    truncatedNote.textContent = data.truncated
      ? "This window holds more than " + data.limit + " events: only the most recent " + data.limit +
        " are shown. Choose a shorter window to see all of it."
      : "";
  }

  function scheduleRefresh() {
    window.clearTimeout(refreshTimer);
    if (data.active && data.follows_now) {
      refreshTimer = window.setTimeout(refresh, config.refreshMs);
    } else if (data.follows_now) {
      refreshTimer = window.setTimeout(refresh, IDLE_REFRESH);
    }
  }

  function load(params) {
    var url = config.dataUrl + "?" + new URLSearchParams(params).toString();
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) {
          throw new Error(response.status + " " + response.statusText);
        }
        return response.json();
      });
  }

  /* Only what changed lately: the runs and markers from a little before the last look on, merged in by lane id. */
  function merge(fresh, base) {
    var cut = fresh.start;
    var remap = {};
    ["thread", "key"].forEach(function (mode) {
      var index = {};
      base.lanes[mode].forEach(function (lane, number) { index[lane.id] = number; });
      remap[mode] = fresh.lanes[mode].map(function (lane) {
        if (!(lane.id in index)) {
          index[lane.id] = base.lanes[mode].length;
          base.lanes[mode].push(lane);
        }
        return index[lane.id];
      });
    });
    var left = fresh.now - (base.end - base.start);
    base.runs = base.runs.filter(function (run) { return run.end !== null && run.end < cut && run.end >= left; })
      .concat(fresh.runs.map(function (run) {
        run.thread_lane = remap.thread[run.thread_lane];
        run.key_lane = remap.key[run.key_lane];
        return run;
      }));
    base.markers = base.markers.filter(function (marker) { return marker.at < cut && marker.at >= left; })
      .concat(fresh.markers.map(function (marker) {
        marker.key_lane = remap.key[marker.key_lane];
        return marker;
      }));
    base.start = left;
    base.end = fresh.now;
    base.now = fresh.now;
    base.active = fresh.active;
    return base;
  }

  function refresh() {
    var whole = data.aggregated || !data.follows_now || query !== config.query || refreshes >= FULL_EVERY;
    var params = whole ? query : { from: new Date(data.now - 3000).toISOString() };
    if (!whole) {
      ["task", "key"].forEach(function (name) {
        if (config.query[name]) {
          params[name] = config.query[name];
        }
      });
    }
    load(params)
      .then(function (fresh) {
        if (whole) {
          data = fresh;
          refreshes = 0;
          if (query === config.query) {
            pageWindow = [data.start, data.end];
          }
        } else if (fresh.aggregated || data.runs.length + fresh.runs.length > config.runBudget) {
          refreshes = FULL_EVERY; // grown past what is drawn one by one: the next look takes the whole window
          data.now = fresh.now;
        } else {
          data = merge(fresh, data);
          refreshes += 1;
        }
        describe();
        render();
        scheduleRefresh();
      })
      .catch(function (error) {
        refreshStatus.textContent = "could not refresh (" + error.message + "); trying again";
        refreshTimer = window.setTimeout(refresh, IDLE_REFRESH);
      });
  }

  function start() {
    config = JSON.parse(document.getElementById("kj-timeline-config").textContent);
    data = JSON.parse(document.getElementById("kj-timeline-data").textContent);
    query = config.query;
    pageWindow = [data.start, data.end];
    root = document.getElementById("kj-timeline");
    tooltip = document.getElementById("kj-tooltip");
    refreshStatus = document.getElementById("kj-refresh-status");
    truncatedNote = document.getElementById("kj-truncated");
    rangeNote = document.getElementById("kj-range");
    document.getElementById("kj-lanes-thread").addEventListener("click", function () { setLanes("thread"); });
    document.getElementById("kj-lanes-key").addEventListener("click", function () { setLanes("key"); });
    document.getElementById("kj-zoom-in").addEventListener("click", function () { zoom(0.5, dataAnchor()); });
    document.getElementById("kj-zoom-out").addEventListener("click", function () { zoom(2); });
    document.getElementById("kj-zoom-fit").addEventListener("click", function () { view = null; render(); });
    document.getElementById("kj-zoom-window").addEventListener("click", function () {
      view = pageWindow.slice();
      render();
      detailLater();
    });
    root.addEventListener("keydown", function (event) {
      if (event.key === "+" || event.key === "=") { zoom(0.5, dataAnchor()); }
      if (event.key === "-") { zoom(2); }
      if (event.key === "0") { view = null; render(); }
    });
    startDragging();
    var resizeTimer = null;
    window.addEventListener("resize", function () {
      window.clearTimeout(resizeTimer);
      resizeTimer = window.setTimeout(render, 100);
    });
    setLanes(config.lanes);
    scheduleRefresh();
    document.body.dataset.timelineReady = "true";
  }

  document.addEventListener("DOMContentLoaded", start);
})();
