package main

// A WeChat message as IM message elements, where IM has an element of its
// own for it; the others cross as their readable text (readableText).

import "strconv"

// pushElems returns the IM elements that carry p natively, or nil when it
// crosses as text. A location becomes a TIMLocationElem with WeChat's label
// and coordinates, exactly.
func pushElems(p Push) []MsgElem {
	if p.MsgType != msgLocation {
		return nil
	}
	lat, err1 := strconv.ParseFloat(p.LocationX, 64)
	lng, err2 := strconv.ParseFloat(p.LocationY, 64)
	if err1 != nil || err2 != nil || lat < -90 || lat > 90 || lng < -180 || lng > 180 {
		return nil // not coordinates: the text says what came
	}
	return []MsgElem{{MsgType: "TIMLocationElem", MsgContent: map[string]any{"Desc": p.Label, "Latitude": lat, "Longitude": lng}}}
}
